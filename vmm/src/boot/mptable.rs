//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI
//! learns its CPUs' LAPIC IDs, the IOAPIC, and how ISA IRQs reach it.
//! Written at the start of the last KiB of base memory, where Linux scans.

use crate::memory::{GuestRam, MemoryError};

/// Where the floating pointer goes (639 KiB: the last KiB of base memory).
pub const MPTABLE_ADDR: u64 = 639 * 1024;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The LAPIC's MMIO address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Most CPUs the table (and the xAPIC IDs) can describe here.
pub const MAX_CPUS: u8 = 254;

const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU, APIC
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table's bytes for `cpus` CPUs, as placed at `addr`.
pub fn build(addr: u64, cpus: u8) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = vec![0u8, id, LAPIC_VERSION, if id == 0 { 3 } else { 1 }];
        e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        e.extend_from_slice(&[0u8; 8]);
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let ioapic_id = cpus;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ i -> IOAPIC pin i; pin 0 is ExtINT (the PIC), as on a PC.
    for irq in 0u8..16 {
        let kind = if irq == 0 { 3 } else { 0 };
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0: ExtINT, LINT1: NMI, on every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let header_len = 44usize;
    let table_len = (header_len + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"BULKHEAD");
    table.extend_from_slice(b"BULKHEAD-VMM");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = (addr + 16) as u32;
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Writes the table for `cpus` CPUs at [`MPTABLE_ADDR`].
pub fn write(ram: &GuestRam, cpus: u8) -> Result<(), MemoryError> {
    ram.write(MPTABLE_ADDR, &build(MPTABLE_ADDR, cpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_sum_to_zero_and_the_table_fits_below_the_bios_area() {
        let t = build(MPTABLE_ADDR, 4);
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        assert_eq!(&t[16..20], b"PCMP");
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(sum(&t[16..16 + len]), 0);
        assert!(MPTABLE_ADDR + t.len() as u64 <= 0xa0000);
        assert_eq!(
            u16::from_le_bytes([t[16 + 34], t[16 + 35]]),
            4 + 1 + 1 + 16 + 2
        );
    }
}
