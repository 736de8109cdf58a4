//! Measurements behind the ignored tests and `cargo xtask bench`/`load`: they print
//! figures and assert only what must hold (money and bytes), never a time.

pub mod kernel;
pub mod latency;
pub mod load;
pub mod memory;

/// The `p`-th percentile (0-100) of `sorted` (ascending, not empty): the nearest
/// rank at or below it.
pub fn percentile(sorted: &[std::time::Duration], p: usize) -> std::time::Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}
