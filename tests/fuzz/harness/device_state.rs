//! Target `device_state`: the device-state loaders (issue 22). A blob from a
//! frontend (DEVICE_STATE load) or from the inflight area is untrusted: the
//! envelope (`bulkhead_common::state::decode`), then a real device's
//! `parse_state` and `apply_state` (`NetDevice` over stand-in taps,
//! `ConsoleDevice` over file ports, blk's `BlkState`); and the inflight
//! area's two-slot state section over arbitrary bytes.
//!
//! Input: mode u8 (0 net, 1 console, 2 blk, 3 state section), then
//! - modes 0 to 2: fix u8 (bit 0: rewrite the envelope's length, bit 1: its
//!   checksum, so mutations reach the payload parser), acked features u64,
//!   net: pairs u8 and MAC flag u8, console: ports u8; then the blob (rest);
//! - mode 3: garbage offset u32, length u16 and bytes, a blob length u16,
//!   then the blob.
//!
//! Invariants: no panic; a blob the device accepts is the canonical
//! encoding of what it applied (saving right after loading gives the same
//! payload back); a refused blob changes nothing (all or nothing); a
//! section never yields more than `MAX_BLOB` bytes, and after a store it
//! yields exactly what was stored.

use std::path::PathBuf;
use std::sync::Arc;

use bulkhead_blk::state::BlkState;
use bulkhead_common::VhostUserDevice;
use bulkhead_common::spec::VIRTIO_F_VERSION_1;
use bulkhead_common::spec::net::{VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
use bulkhead_common::state::{
    DeviceType, HEADER_LEN, MAX_BLOB, SECTION_LEN, StateSection, Stored, crc32, decode, encode,
};
use bulkhead_console::device::ConsoleDevice;
use bulkhead_console::port::{HostSpec, Port};
use bulkhead_net::device::{NetConfig, NetDevice};
use bulkhead_net::request::MacAddr;
use bulkhead_net::tap::Tap;
use vm_memory::{Bytes, MmapRegion, VolatileMemory};

use super::input::{Input, Seed};
use super::net::packet_pair;

const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
/// Port names of a console with up to three ports (port 0 has none).
const NAMES: [Option<&str>; 3] = [None, Some("org.example.log"), Some("p2")];

/// Rewrites the envelope's length and checksum as `fix` asks.
fn fixed(blob: &[u8], fix: u8) -> Vec<u8> {
    let mut b = blob.to_vec();
    if b.len() >= HEADER_LEN {
        let payload_len = (b.len() - HEADER_LEN) as u32;
        if fix & 1 != 0 {
            b[8..12].copy_from_slice(&payload_len.to_le_bytes());
        }
        if fix & 2 != 0 {
            let crc = crc32(&b[HEADER_LEN..]);
            b[12..16].copy_from_slice(&crc.to_le_bytes());
        }
    }
    b
}

/// Loads `blob` into `dev` as the handler does; checks the invariants;
/// returns whether the device accepted it.
fn load<D: VhostUserDevice>(dev: &D, acked: u64, blob: &[u8]) -> bool {
    let before = dev.save_state();
    // As a migration's destination checks it, before SET_FEATURES: parsed
    // against the features it records; nothing applied.
    if let Ok(p) = decode(dev.device_type(), blob) {
        let _ = dev.parse_state(p, None);
    }
    let acked = Some(acked);
    let parsed =
        decode(dev.device_type(), blob).and_then(|p| dev.parse_state(p, acked).map(|s| (p, s)));
    match parsed {
        Ok((payload, state)) => {
            dev.apply_state(state);
            assert_eq!(
                dev.save_state(),
                payload,
                "an accepted state is not what the device saves back"
            );
            assert_eq!(encode(dev.device_type(), payload).as_deref(), Ok(blob));
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(
                dev.save_state(),
                before,
                "a refused state changed the device"
            );
            false
        }
    }
}

fn net(inp: &mut Input<'_>, fix: u8) -> bool {
    let features = inp.u64();
    let pairs = 1 + u16::from(inp.u8() % 4);
    let mac = inp.bool().then_some(MAC);
    let blob = fixed(inp.rest(), fix);
    let taps = (0..pairs).map(|_| Tap::stand_in(packet_pair().0)).collect();
    let cfg = NetConfig {
        mac,
        mtu: None,
        queue_pairs: pairs,
        queue_size: 256,
    };
    let dev = NetDevice::new(cfg, taps).expect("net device over stand-ins");
    dev.set_features(features).expect("features");
    load(&dev, features, &blob)
}

/// A per-process file the console's ports append to.
fn port_file() -> PathBuf {
    std::env::temp_dir().join(format!("bulkhead-fuzz-state-{}", std::process::id()))
}

fn console(inp: &mut Input<'_>, fix: u8) -> bool {
    let features = inp.u64();
    let nports = 1 + usize::from(inp.u8() % 3);
    let blob = fixed(inp.rest(), fix);
    let file = HostSpec::File(port_file());
    let ports = NAMES[..nports]
        .iter()
        .enumerate()
        .map(|(id, name)| {
            Port::open(id as u32, name.map(String::from), &file, 64)
                .expect("file port")
                .0
        })
        .collect();
    let dev = ConsoleDevice::new(ports).expect("console device");
    dev.set_features(features).expect("features");
    load(&dev, features, &blob)
}

fn blk(inp: &mut Input<'_>, fix: u8) -> bool {
    let features = inp.u64();
    let blob = fixed(inp.rest(), fix);
    if let Ok(p) = decode(DeviceType::Blk, &blob)
        && let Ok(s) = BlkState::parse(p, features)
    {
        assert_eq!(s.encode(), p, "blk state not canonical");
        return true;
    }
    false
}

fn section(inp: &mut Input<'_>) {
    let map = Arc::new(MmapRegion::new(SECTION_LEN).expect("anonymous mapping"));
    let s = StateSection::new(map.clone(), 0).expect("section");
    let off = inp.u32() as usize % SECTION_LEN;
    let n = usize::from(inp.u16());
    let garbage = inp.bytes(n);
    let n = garbage.len().min(SECTION_LEN - off);
    let slice = map.get_slice(0, SECTION_LEN).expect("slice");
    slice.write_slice(&garbage[..n], off).expect("garbage");
    if let Stored::Blob(b) = s.load() {
        assert!(b.len() <= MAX_BLOB, "a slot yielded {} bytes", b.len());
    }
    let len = usize::from(inp.u16());
    let blob = inp.bytes(len).to_vec();
    s.store(&blob).expect("store");
    assert_eq!(s.load(), Stored::Blob(blob.clone()), "store then load");
    // A successor maps the same section and finds the same blob.
    let again = StateSection::new(map, 0).expect("section");
    assert_eq!(again.load(), Stored::Blob(blob));
}

/// Runs one input.
pub fn run(data: &[u8]) {
    accepts(data);
}

/// Runs one input; true when a device accepted its blob (a section: true).
pub fn accepts(data: &[u8]) -> bool {
    let mut inp = Input::new(data);
    let mode = inp.u8() % 4;
    if mode == 3 {
        section(&mut inp);
        return true;
    }
    let fix = inp.u8();
    match mode {
        0 => net(&mut inp, fix),
        1 => console(&mut inp, fix),
        _ => blk(&mut inp, fix),
    }
}

const V1: u64 = VIRTIO_F_VERSION_1;

/// Seeds: a state each device accepts (and one it refuses), a section.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // Net: VERSION_1, CTRL_VQ, CTRL_RX, MQ; two pairs, --mac; promiscuous
    // off, all-multicast on, one unicast and one multicast address.
    let nf = V1 | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_CTRL_RX | VIRTIO_NET_F_MQ;
    let mut p = Vec::new();
    p.extend_from_slice(&nf.to_le_bytes());
    p.push(2);
    p.extend_from_slice(&2u16.to_le_bytes());
    p.push(1);
    p.extend_from_slice(&MAC.0);
    p.push(1);
    p.extend_from_slice(&[2, 0, 0, 0, 0, 7]);
    p.push(1);
    p.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1]);
    let blob = encode(DeviceType::Net, &p).expect("encode");
    let mut s = Seed::new();
    s.u8(0).u8(0).u64(nf).u8(1).u8(1).bytes(&blob);
    out.push(("net", s.finish()));
    let mut s = Seed::new();
    s.u8(0).u8(3).u64(nf).u8(0).u8(1).bytes(&blob);
    out.push(("net-too-many-pairs", s.finish()));

    // Console: VERSION_1, SIZE, MULTIPORT; two ports, both ready, both
    // open, a size, one PORT_OPEN and one RESIZE pending.
    let cf = V1 | 1 | 2;
    let mut p = Vec::new();
    p.extend_from_slice(&cf.to_le_bytes());
    p.push(1);
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&[7, 0]);
    p.extend_from_slice(&120u16.to_le_bytes());
    p.extend_from_slice(&40u16.to_le_bytes());
    let name = b"org.example.log";
    p.extend_from_slice(&[3, name.len() as u8]);
    p.extend_from_slice(name);
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&6u16.to_le_bytes());
    p.extend_from_slice(&1u32.to_le_bytes());
    p.push(1);
    p.extend_from_slice(&5u16.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&100u16.to_le_bytes());
    p.extend_from_slice(&30u16.to_le_bytes());
    let blob = encode(DeviceType::Console, &p).expect("encode");
    let mut s = Seed::new();
    s.u8(1).u8(0).u64(cf).u8(1).bytes(&blob);
    out.push(("console", s.finish()));

    let mut p = V1.to_le_bytes().to_vec();
    p.push(0);
    let blob = encode(DeviceType::Blk, &p).expect("encode");
    let mut s = Seed::new();
    s.u8(2).u8(0).u64(V1).bytes(&blob);
    out.push(("blk", s.finish()));

    let mut s = Seed::new();
    s.u8(3).u32(0).u16(4).bytes(b"BHSS").u16(5).bytes(b"state");
    out.push(("section", s.finish()));
    out
}
