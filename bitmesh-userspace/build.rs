//! Embed the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object lives at `<repo>/target/ebpf/bpfel-unknown-none/release/bitmesh`
//! (override with `BITMESH_EBPF_OBJ`). Its path is exported as `BITMESH_EBPF_OBJ` for
//! `aya::include_bytes_aligned!(env!("BITMESH_EBPF_OBJ"))` in `src/meter`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=BITMESH_EBPF_OBJ");
    let object = match std::env::var_os("BITMESH_EBPF_OBJ") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../target/ebpf/bpfel-unknown-none/release/bitmesh")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        eprintln!(
            "error: the eBPF object {} is missing: build it first with `cargo xtask build-ebpf`",
            object.display()
        );
        std::process::exit(1);
    }
    let object = object.canonicalize().unwrap_or(object);
    println!("cargo:rustc-env=BITMESH_EBPF_OBJ={}", object.display());
}
