//! Measurements behind the ignored tests and `cargo xtask bench`/`load`: they print
//! figures and assert only what must hold (money and bytes), never a time.

pub mod kernel;
pub mod latency;
pub mod load;
pub mod memory;
