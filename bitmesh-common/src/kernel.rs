//! Kernel ABI: everything the eBPF programs and the loader must agree on.
//!
//! * [`abi`]: map names, map keys and values (`#[repr(C)]`, explicit padding, size
//!   checked at compile time), stats indices, load-time globals, program names.
//! * [`parse`]: bounds-checked frame parsing into a [`parse::FrameClass`], generic over
//!   how bytes are read so the very same code runs in the kernel and in host tests.
//! * [`verdict`]: the pure billing rule (frame class, length, client budget -> verdict).
//! * [`garden`]: the per-client limits around it (walled-garden budget, bound source).
//! * [`portal`]: captive-portal interception of an unpaid client's HTTP/HTTPS.
//!
//! The eBPF program only extracts bytes, calls these functions and applies the
//! result (atomic adds, return code), so every branch of the rule is unit-tested on
//! the host in microseconds.

pub mod abi;
pub mod garden;
pub mod mac;
pub mod parse;
pub mod portal;
pub mod verdict;

pub use abi::*;
pub use mac::{Mac, ParseMacError};
pub use garden::{gcra_take, source_as_ipv6, source_is_bound, GardenBucket};
pub use portal::{portal_kind, portal_path_open, PortalKind, PORTAL_MARK};
pub use parse::{classify, segment_header_len, FrameBytes, FrameClass, GardenKind, GatewayConfig};
pub use verdict::{verdict, wire_cost, Budget, Gate, Verdict, FULL_FRAME_BYTES};

/// Builders for crafted Ethernet frames (host tests, kernel tests, benchmarks).
#[cfg(any(test, feature = "user"))]
pub mod frames;
