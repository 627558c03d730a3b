//! Little-endian field readers for config spaces read from a device; a
//! field past the end of the buffer reads as 0 (a short config).

/// u16 at `at`.
pub fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .unwrap_or(0)
}

/// u32 at `at`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

/// u64 at `at`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    let lo = u64::from(le32(b, at));
    let hi = u64::from(le32(b, at + 4));
    lo | (hi << 32)
}
