//! Everything two sides of BitMesh must agree on.
//!
//! * [`kernel`]: the kernel ABI (map keys/values, constants, frame parsing and the
//!   verdict rule). `no_std`, compiled into the eBPF program and into userspace.
//! * behind the `user` feature: the gateway/client wire types, the pricing function and
//!   block counts ([`blocks`]).
#![cfg_attr(not(feature = "user"), no_std)]

// Host tests of the no_std kernel code, and the frame builders, need std.
#[cfg(all(test, not(feature = "user")))]
extern crate std;

pub mod kernel;
#[cfg(feature = "user")]
pub mod blocks;
#[cfg(feature = "user")]
pub mod pricing;
#[cfg(feature = "user")]
pub mod wire;
