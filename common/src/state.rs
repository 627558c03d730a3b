//! Device state: what the driver configured that the rings do not carry (a
//! net device's receive filter, a console's open ports), in a blob that
//! moves it to another daemon.
//!
//! The blob travels two ways. A graceful swap asks the old daemon for it
//! with the vhost-user DEVICE_STATE messages and hands it to the new one;
//! a crash leaves no old daemon to ask, so a daemon that keeps state also
//! writes the blob into a section at the end of the inflight area, which the
//! frontend keeps and hands to the next daemon ([`StateSection`]).
//!
//! A blob is untrusted input (it comes from a frontend, or from shared
//! memory any process holding the area may have written): [`decode`] checks
//! the envelope, and each device parses its payload into a validated value
//! in one function before anything is applied. Layout (little endian):
//!
//! ```text
//! envelope, 16 bytes:  magic "BHDS" | u16 format version | u16 device type
//!                      | u32 payload length | u32 CRC-32 (IEEE) of the payload
//! payload:             device-specific (docs/architecture.md)
//! ```

use std::sync::atomic::{Ordering, fence};
use std::sync::{Arc, Mutex};

use crate::spec::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES;
use vm_memory::{Bytes, MmapRegion, VolatileMemory, VolatileSlice};

/// First bytes of every blob.
pub const MAGIC: [u8; 4] = *b"BHDS";
/// The envelope version this daemon writes and the newest it reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes of the envelope before the payload.
pub const HEADER_LEN: usize = 16;
/// Largest blob, envelope included: a transfer or slot beyond it is refused.
pub const MAX_BLOB: usize = 64 << 10;

/// Which device a blob belongs to (virtio device ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceType {
    /// virtio-net (id 1).
    Net,
    /// virtio-blk (id 2).
    Blk,
    /// virtio-console (id 3).
    Console,
}

impl DeviceType {
    /// The virtio device id written in the envelope.
    pub fn id(self) -> u16 {
        match self {
            DeviceType::Net => 1,
            DeviceType::Blk => 2,
            DeviceType::Console => 3,
        }
    }

    fn name(id: u16) -> &'static str {
        match id {
            1 => "net",
            2 => "blk",
            3 => "console",
            _ => "unknown",
        }
    }
}

/// Why a blob was refused; nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Fewer bytes than the envelope.
    #[error("state blob of {0} bytes is shorter than its 16-byte header")]
    Truncated(usize),
    /// More bytes than [`MAX_BLOB`].
    #[error("state blob of more than {MAX_BLOB} bytes")]
    Oversized,
    /// Not a Bulkhead state blob.
    #[error("not a Bulkhead state blob (bad magic)")]
    BadMagic,
    /// A format version this daemon does not read.
    #[error("state format version {0}, this daemon reads version {FORMAT_VERSION}")]
    Version(u16),
    /// A blob of another device type.
    #[error("state of a {found} device (type {id}), this daemon is {expected}", found = DeviceType::name(*.id), expected = DeviceType::name(.expected.id()))]
    WrongDevice {
        /// Type found in the blob.
        id: u16,
        /// This daemon's type.
        expected: DeviceType,
    },
    /// The payload length disagrees with the bytes received.
    #[error("state payload of {declared} bytes declared, {actual} present")]
    Length {
        /// Length in the envelope.
        declared: u32,
        /// Bytes after the envelope.
        actual: usize,
    },
    /// The payload does not match its checksum.
    #[error("state payload checksum mismatch")]
    Checksum,
    /// The payload ended before a field.
    #[error("state payload ends before {0}")]
    Short(&'static str),
    /// Bytes after the last field.
    #[error("{0} trailing bytes after the state payload")]
    Trailing(usize),
    /// A field holds a value the device cannot have.
    #[error("invalid state: {0}")]
    Invalid(String),
    /// The state was saved by a differently configured daemon or driver.
    #[error("state for another configuration: {0}")]
    Mismatch(String),
}

/// The virtio features a blob records: the acked set without
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub fn virtio_features(acked: u64) -> u64 {
    acked & !VHOST_USER_F_PROTOCOL_FEATURES
}

/// Checks that a blob saved under `saved` features belongs to a driver that
/// acked `acked` now: a state means nothing to a driver that negotiated
/// something else.
pub fn check_features(saved: u64, acked: u64) -> Result<(), StateError> {
    let acked = virtio_features(acked);
    if saved != acked {
        return Err(StateError::Mismatch(format!(
            "saved under virtio features {saved:#x}, the driver acked {acked:#x}"
        )));
    }
    Ok(())
}

/// The features a payload is checked against
/// ([`crate::VhostUserDevice::parse_state`]): the driver's (`acked`), or,
/// before the frontend set any (a migration's destination loads the state
/// before it sets the features the guest negotiated on the source), those
/// the payload was saved under, which must all be features this device
/// offers (`offered`). Every device's payload starts with them, as a u64.
pub fn load_features(payload: &[u8], acked: Option<u64>, offered: u64) -> Result<u64, StateError> {
    if let Some(a) = acked {
        return Ok(a);
    }
    let saved = Reader::new(payload).u64("the features")?;
    let extra = saved & !virtio_features(offered);
    if extra != 0 {
        return Err(StateError::Mismatch(format!(
            "saved under virtio features {saved:#x}, {extra:#x} of which this daemon does not offer"
        )));
    }
    Ok(saved)
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// Wraps `payload` in the envelope for `device`.
pub fn encode(device: DeviceType, payload: &[u8]) -> Result<Vec<u8>, StateError> {
    let len = u32::try_from(payload.len()).map_err(|_| StateError::Oversized)?;
    if payload.len() > MAX_BLOB - HEADER_LEN {
        return Err(StateError::Oversized);
    }
    let mut b = Vec::with_capacity(HEADER_LEN + payload.len());
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&device.id().to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&crc32(payload).to_le_bytes());
    b.extend_from_slice(payload);
    Ok(b)
}

/// Checks the envelope of `blob` for `device` and returns its payload.
pub fn decode(device: DeviceType, blob: &[u8]) -> Result<&[u8], StateError> {
    if blob.len() > MAX_BLOB {
        return Err(StateError::Oversized);
    }
    let (hdr, payload) = blob
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(StateError::Truncated(blob.len()))?;
    if hdr[0..4] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u16::from_le_bytes([hdr[4], hdr[5]]);
    if version != FORMAT_VERSION {
        return Err(StateError::Version(version));
    }
    let id = u16::from_le_bytes([hdr[6], hdr[7]]);
    if id != device.id() {
        return Err(StateError::WrongDevice {
            id,
            expected: device,
        });
    }
    let declared = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if usize::try_from(declared).ok() != Some(payload.len()) {
        return Err(StateError::Length {
            declared,
            actual: payload.len(),
        });
    }
    let crc = u32::from_le_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    if crc != crc32(payload) {
        return Err(StateError::Checksum);
    }
    Ok(payload)
}

/// Reads payload fields in order; every read names the field it wanted,
/// so a short payload says what is missing.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// The next `n` bytes, for field `what`.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], StateError> {
        let (head, tail) = self
            .data
            .split_at_checked(n)
            .ok_or(StateError::Short(what))?;
        self.data = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], StateError> {
        let (head, tail) = self
            .data
            .split_first_chunk::<N>()
            .ok_or(StateError::Short(what))?;
        self.data = tail;
        Ok(*head)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, StateError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A little-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, StateError> {
        self.array(what).map(u16::from_le_bytes)
    }

    /// A little-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        self.array(what).map(u32::from_le_bytes)
    }

    /// A little-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A flag byte: 0 or 1, anything else refused.
    pub fn flag(&mut self, what: &'static str) -> Result<bool, StateError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(StateError::Invalid(format!("{what} is {v}, not 0 or 1"))),
        }
    }

    /// Ends the payload: bytes left over are an error.
    pub fn finish(self) -> Result<(), StateError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(StateError::Trailing(self.data.len()))
        }
    }
}

/// Appends payload fields, little endian.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// Magic of the state section's header.
const SECTION_MAGIC: [u8; 4] = *b"BHSS";
/// Layout version of the state section.
const SECTION_VERSION: u16 = 1;
/// Header (magic, version, slot count, slot size), padded to a cache line.
const SECTION_HEADER: usize = 64;
/// Per slot: u64 generation, u32 length, u32 CRC-32 of the bytes, padded.
const SLOT_HEADER: usize = 64;
/// Bytes of one slot.
const SLOT_LEN: usize = SLOT_HEADER + MAX_BLOB;
/// Highest generation a valid slot has: far beyond any real count of
/// writes, so the next one never wraps or ties.
const MAX_GENERATION: u64 = 1 << 62;
/// Bytes the state section adds at the end of an inflight area.
pub const SECTION_LEN: usize = SECTION_HEADER + 2 * SLOT_LEN;

/// What a state section held when it was attached.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// Never written (all zeroes): a fresh area.
    Empty,
    /// The blob of the newest valid slot.
    Blob(Vec<u8>),
    /// Written, but neither slot is valid; the string says why.
    Corrupt(String),
}

struct SlotState {
    /// Generation of the newest valid slot (0: none).
    generation: u64,
    /// Index of that slot.
    active: usize,
}

/// The device-state section at the end of an inflight area: two slots, each
/// a generation counter, a length, a checksum and a blob. A write fills the
/// slot that is not the newest (generation cleared first, set last), so a
/// daemon killed at any instant leaves one valid slot: the new state or the
/// one before it.
pub struct StateSection {
    mapping: Arc<MmapRegion>,
    base: usize,
    slots: Mutex<SlotState>,
}

impl StateSection {
    /// The section at `base` in `mapping`, which must hold [`SECTION_LEN`]
    /// bytes there (the inflight code maps it so).
    pub fn new(mapping: Arc<MmapRegion>, base: usize) -> Option<Self> {
        let end = base.checked_add(SECTION_LEN)?;
        if end > mapping.len() {
            return None;
        }
        Some(StateSection {
            mapping,
            base,
            slots: Mutex::new(SlotState {
                generation: 0,
                active: 1,
            }),
        })
    }

    fn slice(&self) -> Option<VolatileSlice<'_>> {
        self.mapping.get_slice(self.base, SECTION_LEN).ok()
    }

    fn read_u64(s: &VolatileSlice<'_>, off: usize) -> u64 {
        s.read_obj(off).unwrap_or_default()
    }

    fn read_u32(s: &VolatileSlice<'_>, off: usize) -> u32 {
        s.read_obj(off).unwrap_or_default()
    }

    fn slot_off(i: usize) -> usize {
        SECTION_HEADER + i * SLOT_LEN
    }

    /// Reads slot `i`: (generation, blob) when its length and checksum hold.
    fn read_slot(s: &VolatileSlice<'_>, i: usize) -> Result<(u64, Vec<u8>), String> {
        let off = Self::slot_off(i);
        let generation = Self::read_u64(s, off);
        let len = Self::read_u32(s, off + 8) as usize;
        let crc = Self::read_u32(s, off + 12);
        if generation == 0 {
            return Err(format!("slot {i} was never completed"));
        }
        if generation > MAX_GENERATION {
            return Err(format!(
                "slot {i} has an impossible generation {generation}"
            ));
        }
        if len > MAX_BLOB {
            return Err(format!("slot {i} claims {len} bytes"));
        }
        let mut blob = vec![0u8; len];
        s.read_slice(&mut blob, off + SLOT_HEADER)
            .map_err(|e| format!("slot {i}: {e}"))?;
        if crc32(&blob) != crc {
            return Err(format!("slot {i} fails its checksum"));
        }
        Ok((generation, blob))
    }

    /// Finds the newest valid slot, and remembers it for the next write.
    pub fn load(&self) -> Stored {
        let Some(s) = self.slice() else {
            return Stored::Corrupt("section outside its mapping".into());
        };
        // The section header and both slot headers: all zero in a fresh area.
        let mut heads = [0u8; SECTION_HEADER + 2 * SLOT_HEADER];
        let (hdr, slots) = heads.split_at_mut(SECTION_HEADER);
        let _ = s.read_slice(hdr, 0);
        for (i, h) in slots.chunks_mut(SLOT_HEADER).enumerate() {
            let _ = s.read_slice(h, Self::slot_off(i));
        }
        if heads.iter().all(|&b| b == 0) {
            return Stored::Empty;
        }
        let hdr = &heads[..SECTION_HEADER];
        if hdr[0..4] != SECTION_MAGIC {
            return Stored::Corrupt("no state section header".into());
        }
        let version = u16::from_le_bytes([hdr[4], hdr[5]]);
        if version != SECTION_VERSION {
            return Stored::Corrupt(format!("state section version {version}"));
        }
        let mut best: Option<(u64, usize, Vec<u8>)> = None;
        let mut why = Vec::new();
        for i in 0..2 {
            match Self::read_slot(&s, i) {
                Ok((g, blob)) if best.as_ref().is_none_or(|b| g > b.0) => {
                    best = Some((g, i, blob));
                }
                Ok(_) => {}
                Err(e) => why.push(e),
            }
        }
        let Ok(mut st) = self.slots.lock() else {
            return Stored::Corrupt("state section lock poisoned".into());
        };
        match best {
            Some((g, i, blob)) => {
                *st = SlotState {
                    generation: g,
                    active: i,
                };
                Stored::Blob(blob)
            }
            None => Stored::Corrupt(why.join("; ")),
        }
    }

    /// Writes `blob` (at most [`MAX_BLOB`] bytes) as the newest state.
    pub fn store(&self, blob: &[u8]) -> Result<(), StateError> {
        if blob.len() > MAX_BLOB {
            return Err(StateError::Oversized);
        }
        let Ok(mut st) = self.slots.lock() else {
            return Err(StateError::Invalid("state section lock poisoned".into()));
        };
        let Some(s) = self.slice() else {
            return Err(StateError::Invalid(
                "state section outside its mapping".into(),
            ));
        };
        let target = 1 - st.active;
        let off = Self::slot_off(target);
        let io = |e: vm_memory::volatile_memory::Error| StateError::Invalid(e.to_string());
        // The other slot must not outrank this write: after a load that
        // found the section corrupt (or never ran), it may still hold an
        // old state with a higher generation, which a successor would take.
        let other = Self::slot_off(st.active);
        if Self::read_u64(&s, other) > st.generation {
            s.write_obj(0u64, other).map_err(io)?;
        }
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&SECTION_MAGIC);
        hdr[4..6].copy_from_slice(&SECTION_VERSION.to_le_bytes());
        hdr[6..8].copy_from_slice(&2u16.to_le_bytes());
        hdr[8..12].copy_from_slice(&(SLOT_LEN as u32).to_le_bytes());
        s.write_slice(&hdr, 0).map_err(io)?;
        // Invalidate the target first: a torn write is never a candidate.
        s.write_obj(0u64, off).map_err(io)?;
        fence(Ordering::Release);
        s.write_obj(blob.len() as u32, off + 8).map_err(io)?;
        s.write_obj(crc32(blob), off + 12).map_err(io)?;
        s.write_slice(blob, off + SLOT_HEADER).map_err(io)?;
        fence(Ordering::Release);
        // At most MAX_GENERATION + 1: `load` never keeps a larger one.
        let generation = st.generation + 1;
        s.write_obj(generation, off).map_err(io)?;
        fence(Ordering::Release);
        *st = SlotState {
            generation,
            active: target,
        };
        Ok(())
    }
}

/// Where a device writes its state after each change the driver makes
/// (see [`StateSection`]); nowhere until the handler attaches a section.
#[derive(Default)]
pub struct StateSink(Mutex<Option<Arc<StateSection>>>);

impl StateSink {
    /// Attaches a section (or detaches with None).
    pub fn attach(&self, section: Option<Arc<StateSection>>) {
        if let Ok(mut g) = self.0.lock() {
            *g = section;
        }
    }

    /// Writes the blob `snapshot` builds into the attached section, if any.
    /// The snapshot is taken under the sink's lock, so two threads that
    /// persist one after the other leave the later state, never the earlier.
    /// Call it without holding a lock the snapshot takes.
    pub fn persist(&self, device: DeviceType, snapshot: impl FnOnce() -> Vec<u8>) {
        let Ok(g) = self.0.lock() else { return };
        let Some(section) = g.as_ref() else { return };
        let r = encode(device, &snapshot()).and_then(|blob| section.store(&blob));
        if let Err(e) = r {
            crate::rate_limited!(
                log::Level::Error,
                "cannot keep the device state in the inflight area: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_before_set_features_checks_the_saved_features_against_the_offer() {
        let mut payload = 0b1011u64.to_le_bytes().to_vec();
        payload.push(1);
        // After SET_FEATURES: the driver's features, whatever the payload says.
        assert_eq!(load_features(&payload, Some(0b1), 0), Ok(0b1));
        // Before: the saved ones, all offered.
        assert_eq!(load_features(&payload, None, 0b1111), Ok(0b1011));
        assert_eq!(
            load_features(&payload, None, 0b1111 | VHOST_USER_F_PROTOCOL_FEATURES),
            Ok(0b1011)
        );
        assert!(matches!(
            load_features(&payload, None, 0b0011),
            Err(StateError::Mismatch(_))
        ));
        assert!(matches!(
            load_features(&payload[..5], None, u64::MAX),
            Err(StateError::Short(_))
        ));
    }

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn envelope_round_trips_and_refuses_every_damage() {
        let blob = encode(DeviceType::Net, b"payload").unwrap();
        assert_eq!(blob.len(), HEADER_LEN + 7);
        assert_eq!(decode(DeviceType::Net, &blob), Ok(&b"payload"[..]));
        assert!(matches!(
            decode(DeviceType::Console, &blob),
            Err(StateError::WrongDevice { id: 1, .. })
        ));
        assert_eq!(
            decode(DeviceType::Net, &blob[..10]),
            Err(StateError::Truncated(10))
        );
        assert!(matches!(
            decode(DeviceType::Net, &blob[..blob.len() - 1]),
            Err(StateError::Length { .. })
        ));
        let mut b = blob.clone();
        b[0] = b'X';
        assert_eq!(decode(DeviceType::Net, &b), Err(StateError::BadMagic));
        let mut b = blob.clone();
        b[4] = 2;
        assert_eq!(decode(DeviceType::Net, &b), Err(StateError::Version(2)));
        let mut b = blob.clone();
        b[HEADER_LEN] ^= 1;
        assert_eq!(decode(DeviceType::Net, &b), Err(StateError::Checksum));
        assert_eq!(
            decode(DeviceType::Net, &vec![0u8; MAX_BLOB + 1]),
            Err(StateError::Oversized)
        );
        assert_eq!(
            encode(DeviceType::Net, &vec![0u8; MAX_BLOB]),
            Err(StateError::Oversized)
        );
        let msg = decode(DeviceType::Console, &blob).unwrap_err().to_string();
        assert!(
            msg.contains("net device") && msg.contains("console"),
            "{msg}"
        );
    }

    #[test]
    fn reader_names_what_is_missing_and_refuses_trailing_bytes() {
        let mut r = Reader::new(&[1, 2, 0]);
        assert_eq!(r.flag("a"), Ok(true));
        assert!(matches!(r.flag("b"), Err(StateError::Invalid(_))));
        assert_eq!(r.u16("c"), Err(StateError::Short("c")));
        assert_eq!(r.u8("d"), Ok(0));
        assert_eq!(r.finish(), Ok(()));
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16("e"), Ok(0x0201));
        assert_eq!(r.finish(), Err(StateError::Trailing(1)));
    }

    fn section() -> (Arc<MmapRegion>, StateSection) {
        let m = Arc::new(MmapRegion::new(SECTION_LEN + 128).unwrap());
        let s = StateSection::new(m.clone(), 128).unwrap();
        (m, s)
    }

    #[test]
    fn section_keeps_the_newest_blob_across_a_reattach() {
        let (m, s) = section();
        assert_eq!(s.load(), Stored::Empty);
        s.store(b"one").unwrap();
        s.store(b"two").unwrap();
        s.store(b"three").unwrap();
        let again = StateSection::new(m, 128).unwrap();
        assert_eq!(again.load(), Stored::Blob(b"three".to_vec()));
        again.store(b"four").unwrap();
        assert_eq!(again.load(), Stored::Blob(b"four".to_vec()));
        assert!(StateSection::new(Arc::new(MmapRegion::new(64).unwrap()), 0).is_none());
    }

    #[test]
    fn a_write_torn_at_any_byte_leaves_the_previous_blob() {
        let (m, s) = section();
        s.store(b"old state").unwrap();
        // Tear the next write after its invalidation, mid-blob: the slot
        // being written has generation 0 and is ignored.
        let target = StateSection::slot_off(1);
        let sl = m.get_slice(128, SECTION_LEN).unwrap();
        sl.write_obj(0u64, target).unwrap();
        sl.write_slice(b"new st", target + SLOT_HEADER).unwrap();
        let again = StateSection::new(m.clone(), 128).unwrap();
        assert_eq!(again.load(), Stored::Blob(b"old state".to_vec()));
        // A bad checksum in the newest slot falls back to the older one.
        again.store(b"newer").unwrap();
        let active = StateSection::slot_off(1);
        sl.write_obj(0xffu8, active + SLOT_HEADER).unwrap();
        let third = StateSection::new(m, 128).unwrap();
        assert_eq!(third.load(), Stored::Blob(b"old state".to_vec()));
    }

    #[test]
    fn garbage_in_the_section_is_reported_not_trusted() {
        let (m, s) = section();
        m.get_slice(128, 8)
            .unwrap()
            .write_slice(b"garbage!", 0)
            .unwrap();
        assert!(matches!(s.load(), Stored::Corrupt(_)));
        // A write then makes it valid again.
        s.store(b"fresh").unwrap();
        assert_eq!(s.load(), Stored::Blob(b"fresh".to_vec()));
        // Lengths past the slot are refused, not read.
        let sl = m.get_slice(128, SECTION_LEN).unwrap();
        for i in 0..2 {
            let off = StateSection::slot_off(i);
            sl.write_obj(u64::MAX, off).unwrap();
            sl.write_obj(u32::MAX, off + 8).unwrap();
        }
        assert!(matches!(s.load(), Stored::Corrupt(_)));
    }

    #[test]
    fn a_write_after_a_corrupt_load_outranks_every_old_slot() {
        // Found by the device_state fuzz target: a bad section header, and
        // a stale but valid slot with a high generation.
        let (m, s) = section();
        s.store(b"stale").unwrap();
        for _ in 0..5 {
            s.store(b"stale").unwrap();
        }
        let sl = m.get_slice(128, SECTION_LEN).unwrap();
        sl.write_slice(b"XXXX", 0).unwrap();
        let next = StateSection::new(m.clone(), 128).unwrap();
        assert!(matches!(next.load(), Stored::Corrupt(_)));
        next.store(b"fresh").unwrap();
        assert_eq!(next.load(), Stored::Blob(b"fresh".to_vec()));
        let successor = StateSection::new(m, 128).unwrap();
        assert_eq!(successor.load(), Stored::Blob(b"fresh".to_vec()));
    }

    #[test]
    fn an_impossible_generation_is_refused_so_the_next_write_cannot_wrap() {
        let (m, s) = section();
        s.store(b"x").unwrap();
        s.store(b"y").unwrap();
        let sl = m.get_slice(128, SECTION_LEN).unwrap();
        sl.write_obj(u64::MAX, StateSection::slot_off(1)).unwrap();
        assert_eq!(s.load(), Stored::Blob(b"x".to_vec()));
        s.store(b"z").unwrap();
        assert_eq!(s.load(), Stored::Blob(b"z".to_vec()));
    }
}
