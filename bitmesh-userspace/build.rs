//! Embed the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object lives at `<repo>/target/ebpf/bpfel-unknown-none/release/bitmesh`
//! (override with `BITMESH_EBPF_OBJ`). Its path is exported as `BITMESH_EBPF_OBJ` for
//! `aya::include_bytes_aligned!(env!("BITMESH_EBPF_OBJ"))` in `src/meter`.
//!
//! Without the object (a fresh checkout), `cargo check` must still work, but no
//! `bitmesh` binary may come out of `cargo build`. A build script cannot tell a check
//! from a build, so this one embeds an empty stub and sets `cfg(bitmesh_ebpf_stub)`;
//! under that cfg `src/meter/object.rs` refers to an undefined symbol named after the
//! fix, `bitmesh_ebpf_object_missing_run_cargo_xtask_build_ebpf`. `cargo check` never
//! links, so it passes; every link that includes the meter fails on that symbol.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=BITMESH_EBPF_OBJ");
    println!("cargo:rustc-check-cfg=cfg(bitmesh_ebpf_stub)");
    let object = match std::env::var_os("BITMESH_EBPF_OBJ") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../target/ebpf/bpfel-unknown-none/release/bitmesh")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    let object = if object.is_file() {
        object.canonicalize().unwrap_or(object)
    } else {
        println!(
            "cargo:warning=the eBPF object {} is missing: checking against an empty stub; \
             the bitmesh binary will not link until you run `cargo xtask build-ebpf`",
            object.display()
        );
        println!("cargo:rustc-cfg=bitmesh_ebpf_stub");
        let stub = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("bitmesh-ebpf-stub");
        if let Err(e) = std::fs::write(&stub, b"") {
            eprintln!("error: cannot write the eBPF stub {}: {e}", stub.display());
            std::process::exit(1);
        }
        stub
    };
    println!("cargo:rustc-env=BITMESH_EBPF_OBJ={}", object.display());
}
