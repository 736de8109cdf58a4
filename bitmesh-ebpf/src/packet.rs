//! Bounds-checked packet access (the `ptr_at` pattern): every read first proves
//! `data + offset + N <= data_end`, which is what the verifier needs to see.

use bitmesh_common::kernel::FrameBytes;

/// The linear packet buffer of an XDP or TC context.
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// Bytes in the linear buffer.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }
}

impl FrameBytes for Packet {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if self.start + offset + N > self.end {
            return None;
        }
        // SAFETY: the range [start + offset, start + offset + N) lies inside the
        // packet buffer, checked above; [u8; N] has alignment 1.
        Some(unsafe { core::ptr::read((self.start + offset) as *const [u8; N]) })
    }
}
