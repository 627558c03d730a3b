//! Sizes as people write them (`512M`, `2G`): one parser for bulkhead-vmm's
//! `--memory` and the launcher's `vm.memory`, so `bulkhead check` accepts
//! exactly what the VMM will.

/// Parses `512M`, `2G`, `65536K` or a byte count.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512M or 2G"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert!(parse_memory("12Q").is_err());
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("").is_err());
        assert!(parse_memory("99999999999G").is_err());
    }
}
