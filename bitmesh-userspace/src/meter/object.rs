//! The embedded eBPF object (built by `cargo xtask build-ebpf`, see build.rs).

/// The ELF object with all BitMesh programs, aligned for aya's parser.
#[cfg(not(bitmesh_ebpf_stub))]
pub(super) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("BITMESH_EBPF_OBJ"));

/// No object was built (build.rs found none): `cargo check` works, but this refers to a
/// symbol nothing defines, so linking anything that loads the meter fails with an
/// "undefined symbol" error whose name says what to run.
#[cfg(bitmesh_ebpf_stub)]
pub(super) static EBPF_OBJECT: &[u8] = {
    extern "C" {
        static bitmesh_ebpf_object_missing_run_cargo_xtask_build_ebpf: u8;
    }
    // SAFETY: only the address is taken (never read); a zero-length slice at it is never
    // dereferenced, and the link fails before any of this could run.
    unsafe { core::slice::from_raw_parts(&raw const bitmesh_ebpf_object_missing_run_cargo_xtask_build_ebpf, 0) }
};
