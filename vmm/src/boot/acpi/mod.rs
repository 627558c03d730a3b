//! ACPI tables (ACPI 6.5): RSDP, XSDT and RSDT, FADT with a PM1a event and
//! control block (so the guest can power off through `_S5_`), FACS, MADT
//! (one local APIC per vCPU, the IOAPIC) and a DSDT with an `LNRO0005`
//! node per virtio-mmio device (its register window and IRQ), which is how
//! a kernel without `VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's) finds them.
//! The AML is encoded by [`aml`]. Written at [`ACPI_START`], in the BIOS
//! area Linux scans for the RSDP; PVH guests also get the RSDP's address in
//! `hvm_start_info`.

pub mod aml;

use crate::boot::mptable::{IOAPIC_ADDR, LAPIC_ADDR};
use crate::memory::{GuestRam, MemoryError};
use crate::pci::{CONFIG_ADDRESS_PORT, MMIO_WINDOW_SIZE, MMIO_WINDOW_START};

/// Where the RSDP goes; the other tables follow it.
pub const ACPI_START: u64 = 0xe_0000;
/// The PM1a event block (PM1_STS, PM1_EN) I/O port.
pub const PM1A_EVT_PORT: u16 = 0x600;
/// The PM1a control block I/O port.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// The SCI's ISA IRQ (never raised: there are no fixed ACPI events).
pub const SCI_IRQ: u16 = 9;
/// The SLP_TYP value of S5 (soft off) in `_S5_` and the PM1a control register.
pub const S5_SLP_TYP: u8 = 5;

const OEM_ID: &[u8; 6] = b"BLKHD ";
const OEM_TABLE_ID: &[u8; 8] = b"BULKHEAD";
const CREATOR_ID: &[u8; 4] = b"BHVM";

/// A virtio-mmio device to announce in the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Register window base.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// ISA IRQ (edge, active high).
    pub irq: u32,
}

/// The byte that makes `bytes` sum to zero.
pub fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A table: the 36-byte header (length and checksum filled) and `body`.
fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (36 + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(sig);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for `width` bits of I/O port `port`.
fn gas_io(port: u16, width: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // System I/O
    g[1] = width;
    g[3] = match width {
        8 => 1,
        16 => 2,
        _ => 3,
    };
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The PCI host bridge: bus 0, configuration mechanism #1 at 0xCF8, every
/// other I/O port, and the 32-bit BAR window. Without it, Linux in ACPI mode
/// scans no PCI bus at all.
fn pci_host_bridge() -> Vec<u8> {
    let cfg = CONFIG_ADDRESS_PORT as u16;
    aml::device(
        "PCI0",
        &[
            aml::name_decl("_HID", aml::eisa_id("PNP0A03")),
            aml::name_decl("_UID", aml::integer(0)),
            aml::name_decl("_SEG", aml::integer(0)),
            aml::name_decl("_BBN", aml::integer(0)),
            aml::name_decl(
                "_CRS",
                aml::resource_template(&[
                    aml::word_bus_number(0, 0),
                    aml::io(cfg, 8),
                    aml::word_io(0, cfg - 1),
                    aml::word_io(cfg + 8, 0xffff),
                    aml::dword_memory(
                        MMIO_WINDOW_START as u32,
                        (MMIO_WINDOW_START + MMIO_WINDOW_SIZE - 1) as u32,
                    ),
                ]),
            ),
        ],
    )
}

/// The DSDT: `\_SB` with the PCI host bridge and one `LNRO0005` device per
/// virtio-mmio window, and `\_S5_`.
pub fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut nodes: Vec<Vec<u8>> = vec![pci_host_bridge()];
    nodes.extend(devices.iter().enumerate().map(|(i, d)| {
        aml::device(
            &format!("V{i:03X}"),
            &[
                aml::name_decl("_HID", aml::string("LNRO0005")),
                aml::name_decl("_UID", aml::integer(i as u64)),
                aml::name_decl(
                    "_CRS",
                    aml::resource_template(&[
                        aml::memory32_fixed(d.base as u32, d.len as u32),
                        aml::interrupt_edge_high(d.irq),
                    ]),
                ),
            ],
        )
    }));
    let mut body = aml::scope("\\_SB", &nodes);
    let typ = aml::integer(u64::from(S5_SLP_TYP));
    body.extend(aml::name_decl(
        "\\_S5",
        aml::package(&[typ.clone(), typ, aml::integer(0), aml::integer(0)]),
    ));
    table(b"DSDT", 2, &body)
}

/// The FADT (revision 6.5) pointing at `facs` and `dsdt`.
pub fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let put =
        |b: &mut Vec<u8>, off: usize, v: &[u8]| b[off - 36..off - 36 + v.len()].copy_from_slice(v);
    put(&mut b, 36, &(facs as u32).to_le_bytes());
    put(&mut b, 40, &(dsdt as u32).to_le_bytes());
    put(&mut b, 46, &SCI_IRQ.to_le_bytes());
    // SMI_CMD 0: always in ACPI mode (SCI_EN reads as set).
    put(&mut b, 56, &u32::from(PM1A_EVT_PORT).to_le_bytes());
    put(&mut b, 64, &u32::from(PM1A_CNT_PORT).to_le_bytes());
    put(&mut b, 88, &[4, 2]); // PM1_EVT_LEN, PM1_CNT_LEN
    // IAPC_BOOT_ARCH: no VGA, no CMOS RTC, and no 8042 (bit 1 clear): the
    // VMM has neither an RTC nor a keyboard, only the 8042's reset line,
    // which Linux's `reboot=k` path writes without probing. Claiming them
    // made Linux probe both and wait out their timeouts (about 1 s of
    // boot under nested KVM); its wall clock comes from kvm-clock.
    put(&mut b, 109, &((1u16 << 2) | (1 << 5)).to_le_bytes());
    // Flags: WBINVD, C1 on all CPUs, power and sleep buttons absent.
    put(
        &mut b,
        112,
        &(1u32 | (1 << 2) | (1 << 4) | (1 << 5)).to_le_bytes(),
    );
    put(&mut b, 131, &[5]); // minor version: 6.5
    put(&mut b, 132, &facs.to_le_bytes());
    put(&mut b, 140, &dsdt.to_le_bytes());
    put(&mut b, 148, &gas_io(PM1A_EVT_PORT, 32));
    put(&mut b, 172, &gas_io(PM1A_CNT_PORT, 16));
    put(&mut b, 268, b"BULKHEAD");
    table(b"FACP", 6, &b)
}

/// The FACS (64 bytes, no header checksum).
pub fn facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 2; // version
    f
}

/// The MADT: a local APIC per vCPU and the IOAPIC (GSIs from 0).
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for id in 0..cpus {
        b.extend_from_slice(&[0, 8, id, id]);
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, cpus, 0]); // IOAPIC id as in the MP table
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    table(b"APIC", 5, &b)
}

/// Every table laid out from `start`; returns the bytes to write there.
pub fn build(start: u64, cpus: u8, devices: &[MmioDevice]) -> Vec<u8> {
    // RSDP (36) | XSDT | RSDT | FACS (64-byte aligned) | FADT | MADT | DSDT
    let align = |x: u64, a: u64| x.div_ceil(a) * a;
    let dsdt_t = dsdt(devices);
    let madt_t = madt(cpus);
    let xsdt_at = start + 64;
    let xsdt_len = 36 + 2 * 8;
    let rsdt_at = xsdt_at + xsdt_len;
    let rsdt_len = 36 + 2 * 4;
    let facs_at = align(rsdt_at + rsdt_len, 64);
    let fadt_at = facs_at + 64;
    let fadt_t = {
        let madt_at = fadt_at + 276;
        let dsdt_at = madt_at + madt_t.len() as u64;
        (fadt(facs_at, dsdt_at), madt_at, dsdt_at)
    };
    let (fadt_t, madt_at, dsdt_at) = fadt_t;
    let mut x = Vec::new();
    x.extend_from_slice(&fadt_at.to_le_bytes());
    x.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt_t = table(b"XSDT", 1, &x);
    let mut r = Vec::new();
    r.extend_from_slice(&(fadt_at as u32).to_le_bytes());
    r.extend_from_slice(&(madt_at as u32).to_le_bytes());
    let rsdt_t = table(b"RSDT", 1, &r);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&(rsdt_at as u32).to_le_bytes());
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_at.to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let total = (dsdt_at - start) as usize + dsdt_t.len();
    let mut out = vec![0u8; total];
    let mut place = |at: u64, bytes: &[u8]| {
        let off = (at - start) as usize;
        out[off..off + bytes.len()].copy_from_slice(bytes);
    };
    place(start, &rsdp);
    place(xsdt_at, &xsdt_t);
    place(rsdt_at, &rsdt_t);
    place(facs_at, &facs());
    place(fadt_at, &fadt_t);
    place(madt_at, &madt_t);
    place(dsdt_at, &dsdt_t);
    out
}

/// Writes the tables at [`ACPI_START`]; returns the RSDP's address.
pub fn write(ram: &GuestRam, cpus: u8, devices: &[MmioDevice]) -> Result<u64, MemoryError> {
    ram.write(ACPI_START, &build(ACPI_START, cpus, devices))?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// The table at guest address `at` in `img` (laid out from `start`), checked.
    fn table_at<'a>(img: &'a [u8], start: u64, at: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (at - start) as usize;
        assert_eq!(&img[off..off + 4], sig);
        let len = u32_at(img, off + 4) as usize;
        let t = &img[off..off + len];
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    #[test]
    fn tables_parse_back_with_valid_checksums_and_lengths() {
        let devs = [
            MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let start = ACPI_START;
        let img = build(start, 2, &devs);
        assert!(start + img.len() as u64 <= 0x10_0000, "fits below 1 MiB");
        // RSDP.
        assert_eq!(&img[0..8], b"RSD PTR ");
        assert_eq!(sum(&img[..20]), 0);
        assert_eq!(sum(&img[..36]), 0);
        assert_eq!(img[15], 2);
        let xsdt = table_at(&img, start, u64_at(&img, 24), b"XSDT");
        let rsdt = table_at(&img, start, u64::from(u32_at(&img, 16)), b"RSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!(u64::from(u32_at(rsdt, 36)), u64_at(xsdt, 36));
        let fadt = table_at(&img, start, u64_at(xsdt, 36), b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6);
        let madt = table_at(&img, start, u64_at(xsdt, 44), b"APIC");
        // MADT: two local APICs (8 bytes each) and an IOAPIC (12).
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(&madt[60..64], &[1, 12, 2, 0]);
        assert_eq!(u32_at(madt, 64), IOAPIC_ADDR);
        // FADT: PM1a blocks, SCI, FACS and DSDT (32- and 64-bit fields agree).
        assert_eq!(u32_at(fadt, 56), u32::from(PM1A_EVT_PORT));
        assert_eq!(u32_at(fadt, 64), u32::from(PM1A_CNT_PORT));
        assert_eq!(&fadt[88..90], &[4, 2]);
        assert_eq!(u64_at(fadt, 172 + 4), u64::from(PM1A_CNT_PORT));
        assert_eq!(u64::from(u32_at(fadt, 40)), u64_at(fadt, 140));
        let facs_at = u64_at(fadt, 132);
        assert_eq!(facs_at % 64, 0);
        let off = (facs_at - start) as usize;
        assert_eq!(&img[off..off + 4], b"FACS");
        let dsdt = table_at(&img, start, u64_at(fadt, 140), b"DSDT");
        // DSDT: both nodes, with their windows, and \_S5_.
        let aml = &dsdt[36..];
        let count = aml.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        assert!(aml.windows(4).any(|w| w == b"PCI0"));
        assert!(aml.windows(5).any(|w| w == aml::eisa_id("PNP0A03")));
        let node1 = aml::memory32_fixed(0xd000_1000, 0x1000);
        assert!(aml.windows(node1.len()).any(|w| w == node1));
        assert!(aml.windows(9).any(|w| w == aml::interrupt_edge_high(6)));
        let s5 = aml::name_decl(
            "\\_S5",
            aml::package(&[vec![0x0a, 5], vec![0x0a, 5], vec![0], vec![0]]),
        );
        assert!(aml.ends_with(&s5));
    }
}
