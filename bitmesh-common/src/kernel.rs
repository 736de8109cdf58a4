//! Kernel ABI: owned by the kernel fast path work (issue 2).
