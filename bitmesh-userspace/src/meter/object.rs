//! The embedded eBPF object (built by `cargo xtask build-ebpf`, see build.rs).

/// The ELF object with all BitMesh programs, aligned for aya's parser.
pub(super) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("BITMESH_EBPF_OBJ"));
