//! A small AML (ACPI Machine Language) encoder: just what the DSDT needs
//! (ACPI 6.5 section 20): scopes, devices, names, integers, strings,
//! packages and resource-template buffers. Each function returns the
//! encoded bytes of one term.

/// Encodes a PkgLength (20.2.4): the length of what follows *including*
/// the PkgLength bytes themselves.
pub fn pkg_length(payload: usize) -> Vec<u8> {
    // One byte holds up to 63; n extra bytes add 4 + 8 * n bits.
    for extra in 0..=3usize {
        let total = payload + 1 + extra;
        let limit = if extra == 0 {
            1 << 6
        } else {
            1 << (4 + 8 * extra)
        };
        if total < limit {
            if extra == 0 {
                return vec![total as u8];
            }
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    // Beyond 2^28 bytes: not representable; no table here comes close.
    vec![0xff, 0xff, 0xff, 0xff]
}

/// A NameString: `\` root prefix and `.`-separated 4-character segments
/// (shorter segments are padded with `_`).
pub fn name(path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let rest = match path.strip_prefix('\\') {
        Some(r) => {
            out.push(b'\\');
            r
        }
        None => path,
    };
    let segs: Vec<[u8; 4]> = rest
        .split('.')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let mut seg = [b'_'; 4];
            for (d, c) in seg.iter_mut().zip(s.bytes()) {
                *d = c;
            }
            seg
        })
        .collect();
    match segs.len() {
        0 => out.push(0x00), // NullName
        1 => {}
        2 => out.push(0x2e), // DualNamePrefix
        n => {
            out.push(0x2f); // MultiNamePrefix
            out.push(n as u8);
        }
    }
    for s in segs {
        out.extend_from_slice(&s);
    }
    out
}

/// An integer constant in its shortest encoding.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![0x00],
        1 => vec![0x01],
        v if v <= 0xff => vec![0x0a, v as u8],
        v if v <= 0xffff => {
            let mut o = vec![0x0b];
            o.extend_from_slice(&(v as u16).to_le_bytes());
            o
        }
        v if v <= 0xffff_ffff => {
            let mut o = vec![0x0c];
            o.extend_from_slice(&(v as u32).to_le_bytes());
            o
        }
        v => {
            let mut o = vec![0x0e];
            o.extend_from_slice(&v.to_le_bytes());
            o
        }
    }
}

/// A string constant (ASCII, NUL-terminated).
pub fn string(s: &str) -> Vec<u8> {
    let mut o = vec![0x0d];
    o.extend(s.bytes().filter(|b| *b != 0 && b.is_ascii()));
    o.push(0);
    o
}

/// `Name(path, value)`.
pub fn name_decl(path: &str, value: Vec<u8>) -> Vec<u8> {
    let mut o = vec![0x08];
    o.extend(name(path));
    o.extend(value);
    o
}

fn with_pkg(prefix: &[u8], body: Vec<u8>) -> Vec<u8> {
    let mut o = prefix.to_vec();
    o.extend(pkg_length(body.len()));
    o.extend(body);
    o
}

/// `Scope(path) { terms }`.
pub fn scope(path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    let mut body = name(path);
    body.extend(terms.concat());
    with_pkg(&[0x10], body)
}

/// `Device(path) { terms }`.
pub fn device(path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    let mut body = name(path);
    body.extend(terms.concat());
    with_pkg(&[0x5b, 0x82], body)
}

/// `Package() { elements }` (at most 255 elements).
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len().min(255) as u8];
    body.extend(elements.concat());
    with_pkg(&[0x12], body)
}

/// `Buffer() { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = integer(bytes.len() as u64);
    body.extend_from_slice(bytes);
    with_pkg(&[0x11], body)
}

/// Resource descriptor `Memory32Fixed(ReadWrite, base, len)`.
pub fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
    let mut o = vec![0x86, 9, 0, 1];
    o.extend_from_slice(&base.to_le_bytes());
    o.extend_from_slice(&len.to_le_bytes());
    o
}

/// Resource descriptor `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`.
pub fn interrupt_edge_high(gsi: u32) -> Vec<u8> {
    // Flags: bit 0 consumer, bit 1 edge, bit 2 active-low (0), bit 3 shared (0).
    let mut o = vec![0x89, 6, 0, 0x03, 1];
    o.extend_from_slice(&gsi.to_le_bytes());
    o
}

/// `EisaId("PNP0A03")`-style compressed id as an integer (`id` is 3 letters and 4 hex digits).
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    if b.len() != 7 {
        return integer(0);
    }
    let c = |x: u8| u32::from(x.wrapping_sub(b'@') & 0x1f);
    let hex = |x: u8| u32::from((x as char).to_digit(16).unwrap_or(0) as u8);
    let vendor = (c(b[0]) << 10) | (c(b[1]) << 5) | c(b[2]);
    let product = (hex(b[3]) << 12) | (hex(b[4]) << 8) | (hex(b[5]) << 4) | hex(b[6]);
    // Stored big-endian: vendor then product.
    let bytes = [
        (vendor >> 8) as u8,
        vendor as u8,
        (product >> 8) as u8,
        product as u8,
    ];
    integer(u64::from(u32::from_le_bytes(bytes)))
}

/// Resource descriptor `WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, n)`.
pub fn word_bus_number(min: u16, max: u16) -> Vec<u8> {
    word_space(2, 0, min, max)
}

/// Resource descriptor `WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, n)`.
pub fn word_io(min: u16, max: u16) -> Vec<u8> {
    word_space(1, 3, min, max)
}

fn word_space(kind: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
    let mut o = vec![0x88, 0x0d, 0x00, kind, 0x0c, type_flags];
    for v in [0, min, max, 0, max.wrapping_sub(min).wrapping_add(1)] {
        o.extend_from_slice(&v.to_le_bytes());
    }
    o
}

/// Resource descriptor `DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0, min, max, 0, n)`.
pub fn dword_memory(min: u32, max: u32) -> Vec<u8> {
    let mut o = vec![0x87, 0x17, 0x00, 0, 0x0c, 0x01];
    for v in [0, min, max, 0, max.wrapping_sub(min).wrapping_add(1)] {
        o.extend_from_slice(&v.to_le_bytes());
    }
    o
}

/// Resource descriptor `IO(Decode16, min, min, 1, len)`.
pub fn io(port: u16, len: u8) -> Vec<u8> {
    let mut o = vec![0x47, 0x01];
    o.extend_from_slice(&port.to_le_bytes());
    o.extend_from_slice(&port.to_le_bytes());
    o.extend_from_slice(&[1, len]);
    o
}

/// `ResourceTemplate() { descriptors }`: the descriptors and an end tag, as a buffer.
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = descriptors.concat();
    bytes.extend_from_slice(&[0x79, 0x00]); // end tag, checksum 0 = "not computed"
    buffer(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(0), [1]);
        assert_eq!(pkg_length(62), [63]);
        // 63 + 2 bytes = 65 = 0x41: lead byte 0x41 (one extra byte, low nibble 1), then 0x04.
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        // Two bytes hold up to 0xfff; 0xffe + 3 = 0x1001 needs three.
        assert_eq!(pkg_length(0xffd), [0x4f, 0xff]);
        assert_eq!(pkg_length(0xffe), [0x81, 0x00, 0x01]);
        assert_eq!(pkg_length(0x10_0000)[0] >> 6, 3);
    }

    #[test]
    fn eisa_ids_and_pci_resources() {
        // iasl: EisaId("PNP0A03") = 0x030AD041.
        assert_eq!(eisa_id("PNP0A03"), [0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        assert_eq!(
            io(0xcf8, 8),
            [0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]
        );
        let bus = word_bus_number(0, 0);
        assert_eq!(bus.len(), 16);
        assert_eq!(&bus[14..16], &[1, 0], "length 1");
        let mem = dword_memory(0xc000_0000, 0xcfff_ffff);
        assert_eq!(mem.len(), 26);
        assert_eq!(&mem[22..26], &0x1000_0000u32.to_le_bytes());
    }

    #[test]
    fn names_integers_and_strings() {
        assert_eq!(name("\\_SB"), b"\\_SB_");
        assert_eq!(name("_S5"), b"_S5_");
        assert_eq!(name("\\_SB.V000"), b"\\\x2e_SB_V000");
        assert_eq!(integer(0), [0]);
        assert_eq!(integer(1), [1]);
        assert_eq!(integer(5), [0x0a, 5]);
        assert_eq!(integer(0x1234), [0x0b, 0x34, 0x12]);
        assert_eq!(integer(0xd000_0000), [0x0c, 0, 0, 0, 0xd0]);
        assert_eq!(string("AB"), [0x0d, b'A', b'B', 0]);
    }

    #[test]
    fn a_virtio_mmio_node_encodes_as_iasl_would() {
        let dev = device(
            "V000",
            &[
                name_decl("_HID", string("LNRO0005")),
                name_decl("_UID", integer(0)),
                name_decl(
                    "_CRS",
                    resource_template(&[
                        memory32_fixed(0xd000_0000, 0x1000),
                        interrupt_edge_high(5),
                    ]),
                ),
            ],
        );
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &[0x5b, 0x82, 0x3a][..], b"V000",
            &[0x08], b"_HID", &[0x0d], b"LNRO0005", &[0x00],
            &[0x08], b"_UID", &[0x00],
            &[0x08], b"_CRS", &[0x11, 0x1a, 0x0a, 0x17],
            &[0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00],
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00],
            &[0x79, 0x00],
        ]
        .concat();
        assert_eq!(dev, expected);
    }
}
