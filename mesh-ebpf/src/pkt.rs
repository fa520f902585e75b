//! Direct packet access for XDP and TC, behind `mesh_common::parse::Packet`.

use core::mem::size_of;

use mesh_common::parse::Packet;

/// `[start, end)` is what the program may read directly; `frame_len` is the whole frame.
pub struct DirectPacket {
    start: usize,
    end: usize,
    frame_len: usize,
}

impl DirectPacket {
    #[inline(always)]
    pub fn new(start: usize, end: usize, frame_len: usize) -> Self {
        Self {
            start,
            end,
            frame_len,
        }
    }
}

impl Packet for DirectPacket {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.frame_len
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let at = self.start + off;
        // The comparison against `end` (data_end) is what the verifier checks accesses by.
        if at + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: bounds checked above; packet data has no alignment guarantee.
        Some(unsafe { core::ptr::read_unaligned(at as *const T) })
    }
}
