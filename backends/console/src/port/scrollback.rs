//! The bounded scrollback: guest output nobody has read yet.

use std::collections::VecDeque;

/// Bounded FIFO of guest output not yet delivered; drops its oldest bytes when full.
#[derive(Debug)]
pub struct Scrollback {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Scrollback {
    /// An empty scrollback of at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Scrollback {
            buf: VecDeque::new(),
            cap,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity; returns how many were dropped.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let keep = data.len().min(self.cap);
        let dropped_new = data.len() - keep;
        let over = (self.buf.len() + keep).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(&data[dropped_new..]);
        if self.buf.is_empty() {
            // Give the memory back after a burst.
            self.buf.shrink_to(4096);
        }
        over + dropped_new
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The oldest contiguous run of bytes.
    pub fn front(&self) -> &[u8] {
        self.buf.as_slices().0
    }

    /// Forgets the `n` oldest bytes (they were delivered).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        self.buf.drain(..n);
        if self.buf.is_empty() {
            self.buf.shrink_to(4096);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrollback_drops_oldest_and_stays_bounded() {
        let mut s = Scrollback::new(8);
        assert_eq!(s.push(b"abcdef"), 0);
        assert_eq!(s.push(b"ghij"), 2);
        assert_eq!(s.len(), 8);
        let all: Vec<u8> = s.buf.iter().copied().collect();
        assert_eq!(all, b"cdefghij");
        assert_eq!(s.push(b"0123456789"), 10);
        let all: Vec<u8> = s.buf.iter().copied().collect();
        assert_eq!(all, b"23456789");
        s.consume(3);
        assert_eq!(s.len(), 5);
    }
}
