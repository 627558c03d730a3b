//! A swapped or restarted backend keeps what the guest configured (issue
//! 22): the real `bulkhead-console` and `bulkhead-net` processes, driven by
//! the test kit's drivers, their state moved the way a frontend moves it
//! (`bulkhead_tests::device_state`): DEVICE_STATE on a graceful swap, the
//! inflight area's state section after a SIGKILL.
//!
//! Run `cargo build -p bulkhead-console -p bulkhead-net` first. The net
//! tests need root (a namespace with a tap) and say so when skipped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulkhead_common::state::{self as bstate, DeviceType, MAX_BLOB, SECTION_LEN};
use bulkhead_tests::console::{ConsoleDaemon, ConsoleDriver, TIMEOUT, ctl_command, rx_queue};
use bulkhead_tests::device_state::{
    Carried, StateError, bring_up, bring_up_loading, bring_up_migrating, reconnect_after_crash,
    save, stop_all, swap, take_parts, with_device_state,
};
use bulkhead_tests::frontend::{Device, Options};
use bulkhead_tests::net::*;
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::skip::skip_if;
use vhost::VhostBackend;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

const LOG_PORT: &str = "org.example.log";

// ---------------------------------------------------------------- console

fn console_daemon() -> ConsoleDaemon {
    ConsoleDaemon::bulkhead(&["--port", &format!("name={LOG_PORT}")])
        .expect("start bulkhead-console (run `cargo build -p bulkhead-console`)")
}

fn console_opts() -> Options {
    with_device_state(ConsoleDriver::options())
}

fn port_path(d: &ConsoleDaemon, port: u32) -> PathBuf {
    match port {
        0 => d.dir().join("vhost.sock.console"),
        _ => d.dir().join(format!("vhost.sock.{LOG_PORT}")),
    }
}

fn ctl(d: &ConsoleDaemon) -> PathBuf {
    d.dir().join("vhost.sock.console.ctl")
}

/// Resizes port 0 on `d`'s host side.
fn resize(d: &ConsoleDaemon, cols: u16, rows: u16) {
    let reply = ctl_command(&ctl(d), &format!("resize {cols} {rows}")).expect("ctl");
    assert_eq!(reply, "ok");
}

/// Waits until the driver received a RESIZE to (cols, rows) for port 0.
fn wait_resize(drv: &mut ConsoleDriver, cols: u16, rows: u16) -> bool {
    drv.settle(Duration::from_secs(5), |d| {
        d.ports[0].size == Some((cols, rows))
    })
    .is_ok()
}

/// A driver on `d` as Linux brings it up, with the named port opened by a
/// guest process and the console resized to 120x40.
fn configured_console(d: &ConsoleDaemon) -> ConsoleDriver {
    let mut drv = ConsoleDriver::connect(d.socket(), &console_opts()).expect("bring-up");
    drv.linux_bring_up(&[None, Some(LOG_PORT)])
        .expect("Linux bring-up");
    drv.open_port(1).expect("open the named port");
    resize(d, 120, 40);
    assert!(wait_resize(&mut drv, 120, 40), "RESIZE before any swap");
    drv
}

/// Types `data` on port `port`'s host socket of `d`; returns what the
/// driver read from that port within `wait`.
fn type_into(
    d: &ConsoleDaemon,
    drv: &mut ConsoleDriver,
    port: u32,
    data: &[u8],
    wait: Duration,
) -> Vec<u8> {
    let mut c = UnixStream::connect(port_path(d, port)).expect("host client");
    c.write_all(data).expect("host write");
    drv.read(port, data.len(), wait).expect("guest read")
}

/// The console behaves as it did on the daemon the driver configured:
/// input on both ports reaches it, a resize reaches it.
fn assert_console_as_configured(d: &ConsoleDaemon, drv: &mut ConsoleDriver, cols: u16) {
    assert_eq!(
        type_into(d, drv, 1, b"named port input", TIMEOUT),
        b"named port input",
        "host input on the opened named port reaches the guest"
    );
    assert_eq!(
        type_into(d, drv, 0, b"hvc0 input", TIMEOUT),
        b"hvc0 input",
        "host input on the console reaches the guest"
    );
    resize(d, cols, 30);
    assert!(
        wait_resize(drv, cols, 30),
        "a resize reaches the guest as RESIZE: {:?}",
        drv.received.last()
    );
    assert_eq!(drv.unknown_used, 0);
}

#[test]
fn a_console_swapped_with_device_state_keeps_its_open_port_and_resizes() {
    let a = console_daemon();
    let b = console_daemon();
    let mut drv = configured_console(&a);
    let blob = swap(&mut drv.dev, b.socket(), &console_opts()).expect("swap to b");
    assert!(bstate::decode(DeviceType::Console, &blob).is_ok());
    // Linux never sends PORT_OPEN again: the new daemon must know it.
    assert_console_as_configured(&b, &mut drv, 100);
    // b took the size the guest was told (120x40) until its host side resized.
    let cfg = drv.read_config().expect("config");
    assert_eq!((cfg.cols, cfg.rows), (100, 30));
}

#[test]
fn a_console_without_its_state_loses_the_open_port_which_is_what_the_swap_fixes() {
    // The control for the test above: a new daemon brought up the same way
    // but without the state takes no input on the port the guest opened.
    let a = console_daemon();
    let b = console_daemon();
    let mut drv = configured_console(&a);
    let bases = stop_all(&mut drv.dev).expect("stop");
    let carried = Carried {
        parts: take_parts(&mut drv.dev),
        bases,
    };
    let opts = Options {
        inflight: false,
        ..console_opts()
    };
    drv.dev = bring_up(b.socket(), &opts, Some(carried), None).expect("bring-up");
    assert!(
        type_into(&b, &mut drv, 1, b"lost", Duration::from_millis(500)).is_empty(),
        "without state the port is closed"
    );
}

#[test]
fn a_console_restarted_after_sigkill_keeps_its_open_port_and_resizes() {
    let a = console_daemon();
    let mut drv = configured_console(&a);
    drop(a); // SIGKILL: nobody to ask for the state
    let c = console_daemon();
    reconnect_after_crash(&mut drv.dev, c.socket(), &console_opts()).expect("reconnect");
    assert_console_as_configured(&c, &mut drv, 90);
    // The restarted daemon keeps the state current too: a second crash.
    drop(c);
    let d = console_daemon();
    reconnect_after_crash(&mut drv.dev, d.socket(), &console_opts()).expect("reconnect");
    assert_console_as_configured(&d, &mut drv, 80);
}

#[test]
fn a_hundred_console_swaps_with_an_idle_guest_keep_every_receive_buffer() {
    let a = console_daemon();
    let b = console_daemon();
    let mut drv = configured_console(&a);
    let rings = [rx_queue(0), rx_queue(1)];
    let used = |drv: &ConsoleDriver| -> Vec<u16> {
        rings
            .iter()
            .map(|&q| drv.dev.queues[q].used_idx().expect("used idx"))
            .collect()
    };
    let before = used(&drv);
    let posted = (drv.posted_rx(0), drv.posted_rx(1));
    assert!(posted.0 > 0 && posted.1 > 0);
    for i in 0..100 {
        let to = if i % 2 == 0 { &b } else { &a };
        swap(&mut drv.dev, to.socket(), &console_opts())
            .unwrap_or_else(|e| panic!("swap {i}: {e:?}"));
    }
    // Each daemon held a buffer of each open port at every stop: none was
    // used (given back to the ring instead), none is lost.
    assert_eq!(used(&drv), before, "receive buffers were used at a stop");
    assert_eq!((drv.posted_rx(0), drv.posted_rx(1)), posted);
    assert_console_as_configured(&a, &mut drv, 110);
}

/// A configured console's state blob, and the daemon and driver it came from.
fn saved_console() -> (ConsoleDaemon, ConsoleDriver, Vec<u8>) {
    let a = console_daemon();
    let mut drv = configured_console(&a);
    stop_all(&mut drv.dev).expect("stop");
    let blob = save(&drv.dev.frontend).expect("save");
    (a, drv, blob)
}

/// `blob` with its payload replaced by `f(payload)`, checksum recomputed.
fn repack(blob: &[u8], device: DeviceType, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut p = bstate::decode(DeviceType::Console, blob)
        .expect("a good blob")
        .to_vec();
    f(&mut p);
    bstate::encode(device, &p).expect("encode")
}

#[test]
fn malformed_console_state_is_refused_with_nothing_applied_and_serving_goes_on() {
    let (_a, mut drv, good) = saved_console();
    // Header, then port 0: flags, name length 0, cols, rows; then port 1.
    let port1 = 8 + 1 + 4 + 6;
    let mut newer = good.clone();
    newer[4] = 2;
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated header", good[..10].to_vec()),
        ("truncated payload", good[..good.len() - 1].to_vec()),
        ("oversized", vec![0x5a; MAX_BLOB + 4096]),
        ("garbage", (0..300u32).map(|i| (i * 37) as u8).collect()),
        ("newer version", newer),
        ("bad checksum", bad_crc),
        ("wrong device", repack(&good, DeviceType::Net, |_| {})),
        (
            "port flags out of range",
            repack(&good, DeviceType::Console, |p| p[port1] |= 0x80),
        ),
        (
            "another port name",
            repack(&good, DeviceType::Console, |p| {
                let at = port1 + 2 + 3;
                p[at] ^= 1;
            }),
        ),
        (
            "another port count",
            repack(&good, DeviceType::Console, |p| p[9] = 3),
        ),
        (
            "trailing byte",
            repack(&good, DeviceType::Console, |p| p.push(0)),
        ),
        (
            "a pending message for a port that does not exist",
            repack(&good, DeviceType::Console, |p| {
                // After port 1 (flags, name, size): the pending count.
                p.truncate(port1 + 2 + LOG_PORT.len() + 4);
                p.extend_from_slice(&1u16.to_le_bytes());
                p.extend_from_slice(&6u16.to_le_bytes());
                p.extend_from_slice(&9u32.to_le_bytes());
                p.push(1);
            }),
        ),
    ];
    let b = console_daemon();
    for (what, blob) in &cases {
        let r = bring_up_loading(b.socket(), &console_opts(), None, Some(blob));
        let (_dev, loaded) = r.unwrap_or_else(|e| panic!("{what}: bring-up: {e:?}"));
        assert!(
            matches!(loaded, Err(StateError::Refused("CHECK_DEVICE_STATE", _))),
            "{what}: {loaded:?}"
        );
    }
    // Nothing of a refused blob applies: its ports were open, yet after the
    // refusal b keeps its defaults and the opened port takes no input.
    let (_, bad) = cases.last().expect("a case");
    let bases = drv
        .dev
        .queues
        .iter()
        .map(|q| q.used_idx().expect("used"))
        .collect();
    let carried = Carried {
        parts: take_parts(&mut drv.dev),
        bases,
    };
    let opts = Options {
        inflight: false,
        ..console_opts()
    };
    let (dev, loaded) =
        bring_up_loading(b.socket(), &opts, Some(carried), Some(bad)).expect("bring-up");
    assert!(loaded.is_err());
    drv.dev = dev;
    assert!(
        type_into(&b, &mut drv, 1, b"nope", Duration::from_millis(500)).is_empty(),
        "a refused state left the port open"
    );
    // And b serves a good state at once (one frontend at a time: this one leaves).
    drop(drv);
    let fresh = bring_up(b.socket(), &console_opts(), None, Some(&good));
    assert!(fresh.is_ok(), "{:?}", fresh.err());
}

/// A frontend that opens a DEVICE_STATE connection up to SET_FEATURES.
fn bare_frontend(socket: &std::path::Path) -> Frontend {
    let mut fe = Frontend::connect(socket, 1).expect("connect");
    fe.set_owner().expect("SET_OWNER");
    let offered = fe.get_features().expect("GET_FEATURES");
    let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(proto.contains(VhostUserProtocolFeatures::DEVICE_STATE));
    fe.set_protocol_features(VhostUserProtocolFeatures::DEVICE_STATE)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_features(offered).expect("SET_FEATURES");
    fe
}

fn pipe() -> (File, File) {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds we own.
    unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) }
}

#[test]
fn a_frontend_that_never_closes_its_end_gets_an_error_not_a_hang() {
    let b = console_daemon();
    let fe = bare_frontend(b.socket());
    let (rd, mut wr) = pipe();
    fe.set_device_state_fd(
        VhostTransferStateDirection::LOAD,
        VhostTransferStatePhase::STOPPED,
        OwnedFd::from(rd),
    )
    .expect("SET_DEVICE_STATE_FD");
    wr.write_all(b"half a state").unwrap();
    let t0 = Instant::now();
    let r = fe.check_device_state();
    let took = t0.elapsed();
    assert!(r.is_err(), "a load that never ended succeeded");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(9),
        "CHECK_DEVICE_STATE answered after {took:?}, not at the 5 s deadline"
    );
    drop(wr);
    drop(fe);
    // The daemon still serves.
    let fresh = bring_up(b.socket(), &console_opts(), None, None);
    assert!(fresh.is_ok(), "{:?}", fresh.err());
}

#[test]
fn device_state_is_refused_while_rings_run_or_without_the_protocol_feature() {
    let a = console_daemon();
    let mut drv = configured_console(&a);
    assert!(matches!(
        save(&drv.dev.frontend),
        Err(StateError::Refused("SET_DEVICE_STATE_FD(SAVE)", _))
    ));
    // A file is not a stream with an end the frontend controls.
    stop_all(&mut drv.dev).expect("stop");
    // SAFETY: memfd_create with a static name; the File owns the fd.
    let m = unsafe { File::from_raw_fd(libc::memfd_create(c"s".as_ptr(), libc::MFD_CLOEXEC)) };
    assert!(
        drv.dev
            .frontend
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(m),
            )
            .is_err()
    );
    // CHECK_DEVICE_STATE with no transfer: an error.
    assert!(drv.dev.frontend.check_device_state().is_err());
    drop(drv);
    // Without DEVICE_STATE acked, the raw message is answered with an error.
    let plain = ConsoleDriver::connect(a.socket(), &ConsoleDriver::options()).expect("bring-up");
    assert!(
        !plain
            .dev
            .acked_protocol
            .contains(VhostUserProtocolFeatures::DEVICE_STATE)
    );
    let raw =
        bulkhead_tests::frontend::RawConnection::from_frontend(&plain.dev.frontend).expect("raw");
    let (_rd, wr) = pipe();
    let mut body = Vec::new();
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    use std::os::fd::AsRawFd;
    raw.send(42, 0, &body, &[wr.as_raw_fd()]).expect("send");
    let reply = raw.recv(TIMEOUT).expect("recv").expect("a reply");
    assert_eq!(reply.request, 42);
    let v = u64::from_le_bytes(reply.payload[..8].try_into().expect("u64"));
    assert_ne!(v & 0xff, 0, "refused (reply {v:#x})");
}

/// Offset of the state section in the kit's inflight area.
fn section_offset(dev: &Device) -> u64 {
    let inf = dev.inflight.as_ref().expect("an inflight area");
    inf.info.mmap_size - SECTION_LEN as u64
}

const SLOT_LEN: u64 = 64 + MAX_BLOB as u64;

/// A way to damage the inflight area's file.
type Damage<'a> = Box<dyn Fn(&File) + 'a>;

#[test]
fn a_corrupt_state_section_after_a_crash_means_defaults_not_a_panic() {
    let a = console_daemon();
    let mut drv = configured_console(&a);
    drop(a);
    let off = section_offset(&drv.dev);
    let file = drv
        .dev
        .inflight
        .as_ref()
        .expect("inflight")
        .file
        .try_clone()
        .expect("dup");
    // A valid slot for another device, with a newer generation.
    let net_blob = bstate::encode(DeviceType::Net, &[0u8; 19]).expect("encode");
    let mut slot = Vec::new();
    slot.extend_from_slice(&(1u64 << 40).to_le_bytes());
    slot.extend_from_slice(&(net_blob.len() as u32).to_le_bytes());
    slot.extend_from_slice(&bstate::crc32(&net_blob).to_le_bytes());
    slot.resize(64, 0);
    slot.extend_from_slice(&net_blob);
    let damage: Vec<(&str, Damage)> = vec![
        (
            "another device's state",
            Box::new(|f: &File| {
                f.write_all_at(&slot, off + 64).expect("write");
                f.write_all_at(&slot, off + 64 + SLOT_LEN).expect("write");
            }),
        ),
        (
            "slots failing their checksums",
            Box::new(|f: &File| {
                for i in 0..2 {
                    let at = off + 64 + i * SLOT_LEN + 64;
                    f.write_all_at(&[0xa5; 64], at).expect("write");
                }
            }),
        ),
        (
            "lengths beyond a slot",
            Box::new(|f: &File| {
                for i in 0..2 {
                    let at = off + 64 + i * SLOT_LEN + 8;
                    f.write_all_at(&u32::MAX.to_le_bytes(), at).expect("write");
                }
            }),
        ),
        (
            "no section header",
            Box::new(|f: &File| f.write_all_at(b"not ours", off).expect("write")),
        ),
    ];
    for (what, hurt) in &damage {
        hurt(&file);
        let c = console_daemon();
        reconnect_after_crash(&mut drv.dev, c.socket(), &console_opts())
            .unwrap_or_else(|e| panic!("{what}: reconnect: {e:?}"));
        assert!(
            type_into(&c, &mut drv, 1, b"closed", Duration::from_millis(500)).is_empty(),
            "{what}: the port is open, so some state was applied"
        );
        // Serving goes on: the driver opens the port again and input flows
        // (after what was typed while it was closed, if that client was
        // still attached).
        drv.open_port(1).expect("open");
        let mut cl = UnixStream::connect(port_path(&c, 1)).expect("host client");
        cl.write_all(b"open").expect("host write");
        let got = drv.read(1, 10, Duration::from_secs(2)).expect("guest read");
        assert!(got.ends_with(b"open"), "{what}: {got:?}");
        drop(c);
    }
}

#[test]
fn input_typed_on_two_ports_at_the_same_moment_reaches_both() {
    // Issue 22: 16 bytes typed on hvc0's socket at the same moment as on the
    // named port's socket were reported lost under bulkhead-vmm.
    let a = console_daemon();
    let mut drv = configured_console(&a);
    for round in 0..20u8 {
        let mut c0 = UnixStream::connect(port_path(&a, 0)).expect("client 0");
        let mut c1 = UnixStream::connect(port_path(&a, 1)).expect("client 1");
        let d0: Vec<u8> = (0..16).map(|i| b'a' + (i + round) % 26).collect();
        let d1: Vec<u8> = (0..16).map(|i| b'A' + (i + round) % 26).collect();
        let (w0, w1) = (d0.clone(), d1.clone());
        std::thread::scope(|s| {
            s.spawn(move || c0.write_all(&w0).expect("write 0"));
            s.spawn(move || c1.write_all(&w1).expect("write 1"));
        });
        assert_eq!(
            drv.read(0, 16, TIMEOUT).expect("read 0"),
            d0,
            "round {round}"
        );
        assert_eq!(
            drv.read(1, 16, TIMEOUT).expect("read 1"),
            d1,
            "round {round}"
        );
    }
}

// ---------------------------------------------------------------- net

const TAP: &str = "bhstate0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const EXTRA: [u8; 6] = [0x02, 0, 0, 0, 0, 0x77];
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const MC_IN: [u8; 6] = [0x01, 0, 0x5e, 0, 0, 0x01];
const MC_OUT: [u8; 6] = [0x01, 0, 0x5e, 0, 0, 0x02];
const HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ETHERTYPE: u16 = 0x88b5;

/// Daemons on queues of one multi-queue tap (dropped before the namespace).
struct Net {
    daemons: Vec<Option<NetDaemon>>,
    ns: NetNs,
}

impl Net {
    fn new(n: usize, pairs: usize) -> Net {
        let ns = NetNs::new().expect("namespace");
        ns.add_tap(TAP, "10.78.0.1/24", true).expect("tap");
        let mut net = Net {
            daemons: Vec::new(),
            ns,
        };
        for _ in 0..n {
            net.start(pairs);
        }
        net
    }

    /// Starts another daemon on `pairs` new queues of the tap; returns its index.
    fn start(&mut self, pairs: usize) -> usize {
        let fds = self.ns.open_tap_fds(TAP, pairs, true).expect("tap fds");
        let mac = "52:54:00:12:34:56";
        let d = NetDaemon::start_with_fds(fds, &["--mac", mac]).expect("start bulkhead-net");
        self.daemons.push(Some(d));
        self.daemons.len() - 1
    }

    fn d(&self, i: usize) -> &NetDaemon {
        self.daemons[i].as_ref().expect("running")
    }

    fn d_mut(&mut self, i: usize) -> &mut NetDaemon {
        self.daemons[i].as_mut().expect("running")
    }

    /// SIGKILL: the daemon's tap queues go with it.
    fn kill(&mut self, i: usize) {
        self.daemons[i] = None;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.daemons.clear();
    }
}

fn net_opts() -> Options {
    with_device_state(Options::default())
}

fn frame(dst: [u8; 6], tag: u8) -> Vec<u8> {
    ethernet(dst, HOST, ETHERTYPE, &[tag; 50])
}

/// The driver turns promiscuous and all-multicast off, sets the MAC tables
/// and, with two pairs, uses both.
fn configure_net(drv: &mut NetDriver) {
    for pair in 0..drv.pairs {
        drv.post_rx(pair, 32, 2048).expect("post rx");
    }
    if drv.pairs > 1 {
        let n = (drv.pairs as u16).to_le_bytes();
        assert_eq!(
            drv.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &n).unwrap(),
            CTRL_OK
        );
    }
    assert_eq!(drv.ctrl(CTRL_RX, CTRL_RX_PROMISC, &[0]).unwrap(), CTRL_OK);
    assert_eq!(drv.ctrl(CTRL_RX, CTRL_RX_ALLMULTI, &[0]).unwrap(), CTRL_OK);
    let mut t = 1u32.to_le_bytes().to_vec();
    t.extend_from_slice(&EXTRA);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(&MC_IN);
    assert_eq!(drv.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, &t).unwrap(), CTRL_OK);
}

/// Sends frames to ours, a table unicast, a table multicast, and to two
/// addresses the filter refuses; returns the destinations that arrived.
fn filtered(net: &Net, drv: &mut NetDriver) -> Vec<[u8; 6]> {
    let inject = net.ns.packet_socket(TAP, false).expect("packet socket");
    let all = [GUEST_MAC, EXTRA, MC_IN, OTHER, MC_OUT];
    for (i, dst) in all.iter().enumerate() {
        inject.send(&frame(*dst, i as u8)).expect("inject");
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match drv
            .recv_matching(left, |p| p.frame[12..14] == ETHERTYPE.to_be_bytes())
            .expect("receive")
        {
            Some(p) => {
                let mut d = [0u8; 6];
                d.copy_from_slice(&p.frame[..6]);
                got.push(d);
                if got.len() == 3 {
                    // Give a refused frame a moment to show up if it would.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            None => break,
        }
    }
    got.sort();
    got
}

fn expected_accepted() -> Vec<[u8; 6]> {
    let mut v = vec![GUEST_MAC, EXTRA, MC_IN];
    v.sort();
    v
}

fn stats(net: &mut Net, i: usize) -> BTreeMap<String, u64> {
    net.d_mut(i).stats().expect("stats")
}

#[test]
fn a_net_device_swapped_with_device_state_keeps_its_receive_filter_and_pairs() {
    if skip_if(
        "a_net_device_swapped_with_device_state_keeps_its_receive_filter_and_pairs",
        netns::unavailable(),
    ) {
        return;
    }
    let mut net = Net::new(2, 2);
    let mut drv = NetDriver::connect(net.d(0).socket(), &net_opts()).expect("bring-up");
    configure_net(&mut drv);
    assert_eq!(
        filtered(&net, &mut drv),
        expected_accepted(),
        "before the swap"
    );
    let blob = swap(&mut drv.dev, net.d(1).socket(), &net_opts()).expect("swap");
    assert!(bstate::decode(DeviceType::Net, &blob).is_ok());
    net.kill(0);
    let before = stats(&mut net, 1)["rx_filtered"];
    assert_eq!(
        filtered(&net, &mut drv),
        expected_accepted(),
        "after the swap"
    );
    let s = stats(&mut net, 1);
    assert!(s["rx_filtered"] >= before + 2, "{s:?}");
    // The new daemon's own state is the one the old daemon saved (both
    // pairs in use included).
    stop_all(&mut drv.dev).expect("stop");
    assert_eq!(save(&drv.dev.frontend).expect("save"), blob);
}

#[test]
fn a_net_device_restarted_after_sigkill_keeps_its_receive_filter() {
    if skip_if(
        "a_net_device_restarted_after_sigkill_keeps_its_receive_filter",
        netns::unavailable(),
    ) {
        return;
    }
    let mut net = Net::new(1, 2);
    let mut drv = NetDriver::connect(net.d(0).socket(), &net_opts()).expect("bring-up");
    configure_net(&mut drv);
    net.kill(0);
    let c = net.start(2);
    reconnect_after_crash(&mut drv.dev, net.d(c).socket(), &net_opts()).expect("reconnect");
    assert_eq!(
        filtered(&net, &mut drv),
        expected_accepted(),
        "after SIGKILL"
    );
    assert!(
        net.d(c)
            .log()
            .contains("device state restored from the inflight area"),
        "{}",
        net.d(c).log()
    );
    // Promiscuous on again through the restarted daemon: it keeps the area current.
    assert_eq!(drv.ctrl(CTRL_RX, CTRL_RX_PROMISC, &[1]).unwrap(), CTRL_OK);
    net.kill(c);
    let e = net.start(2);
    reconnect_after_crash(&mut drv.dev, net.d(e).socket(), &net_opts()).expect("reconnect");
    let got = filtered(&net, &mut drv);
    assert!(
        got.contains(&OTHER),
        "promiscuous after the second crash: {got:?}"
    );
}

#[test]
fn a_hundred_net_swaps_with_an_idle_guest_keep_every_receive_buffer() {
    if skip_if(
        "a_hundred_net_swaps_with_an_idle_guest_keep_every_receive_buffer",
        netns::unavailable(),
    ) {
        return;
    }
    let mut net = Net::new(2, 1);
    let mut drv = NetDriver::connect(net.d(0).socket(), &net_opts()).expect("bring-up");
    configure_net(&mut drv);
    let posted = drv.rx_posted(0);
    let used_before = drv.dev.queues[0].used_idx().expect("used");
    for i in 0..100 {
        let to = if i % 2 == 0 { 1 } else { 0 };
        let socket = net.d(to).socket().to_path_buf();
        swap(&mut drv.dev, &socket, &net_opts()).unwrap_or_else(|e| panic!("swap {i}: {e:?}"));
    }
    assert_eq!(drv.dev.queues[0].used_idx().expect("used"), used_before);
    assert_eq!(drv.rx_posted(0), posted);
    // Back on daemon 0 alone: every posted buffer takes a frame.
    net.kill(1);
    let inject = net.ns.packet_socket(TAP, false).expect("packet socket");
    for i in 0..posted {
        inject.send(&frame(GUEST_MAC, i as u8)).expect("inject");
    }
    let mut n = 0;
    while drv
        .recv_matching(Duration::from_secs(2), |p| {
            p.frame[12..14] == ETHERTYPE.to_be_bytes()
        })
        .expect("receive")
        .is_some()
    {
        n += 1;
        if n == posted {
            break;
        }
    }
    assert_eq!(n, posted, "every posted receive buffer took a frame");
}

#[test]
fn receive_buffers_held_for_a_frame_that_does_not_fit_yet_go_back_at_a_swap() {
    if skip_if(
        "receive_buffers_held_for_a_frame_that_does_not_fit_yet_go_back_at_a_swap",
        netns::unavailable(),
    ) {
        return;
    }
    let mut net = Net::new(1, 1);
    let opts = net_opts().feature(VIRTIO_NET_F_MRG_RXBUF, true);
    let mut drv = NetDriver::connect(net.d(0).socket(), &opts).expect("bring-up");
    assert!(drv.mergeable());
    // Two 256-byte buffers; a frame of 926 bytes with its header needs
    // four: the daemon takes both and waits for more.
    drv.post_rx(0, 2, 256).expect("post");
    let inject = net.ns.packet_socket(TAP, false).expect("packet socket");
    let big = ethernet(GUEST_MAC, HOST, ETHERTYPE, &[7u8; 900]);
    inject.send(&big).expect("inject");
    std::thread::sleep(Duration::from_millis(300));
    let b = net.start(1);
    swap(&mut drv.dev, net.d(b).socket(), &opts).expect("swap");
    net.kill(0);
    assert_eq!(
        drv.dev.queues[0].used_idx().expect("used"),
        0,
        "the held buffers were used empty instead of given back"
    );
    // With two more buffers the next frame fits in all four.
    drv.post_rx(0, 2, 256).expect("post");
    inject.send(&big).expect("inject");
    let p = drv
        .recv_matching(Duration::from_secs(3), |p| {
            p.frame[12..14] == ETHERTYPE.to_be_bytes()
        })
        .expect("receive")
        .expect("the frame arrives in the four buffers");
    assert_eq!(p.buffers, 4);
}

#[test]
fn malformed_net_state_is_refused_with_nothing_applied() {
    if skip_if(
        "malformed_net_state_is_refused_with_nothing_applied",
        netns::unavailable(),
    ) {
        return;
    }
    let mut net = Net::new(1, 2);
    let mut drv = NetDriver::connect(net.d(0).socket(), &net_opts()).expect("bring-up");
    configure_net(&mut drv);
    stop_all(&mut drv.dev).expect("stop");
    let good = save(&drv.dev.frontend).expect("save");
    let payload = bstate::decode(DeviceType::Net, &good)
        .expect("good")
        .to_vec();
    let pack = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = payload.clone();
        f(&mut p);
        bstate::encode(DeviceType::Net, &p).expect("encode")
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "wrong device",
            bstate::encode(DeviceType::Console, &payload).unwrap(),
        ),
        ("receive mode bits", pack(&|p| p[8] |= 0x10)),
        (
            "more pairs than the daemon has",
            pack(&|p| p[9..11].copy_from_slice(&3u16.to_le_bytes())),
        ),
        ("another MAC", pack(&|p| p[17] ^= 1)),
        ("a table of 65", pack(&|p| p[18] = 65)),
        ("truncated table", pack(&|p| p.truncate(p.len() - 3))),
        ("trailing", pack(&|p| p.push(0))),
    ];
    let b = net.start(2);
    for (what, blob) in &cases {
        let (_d, loaded) = bring_up_loading(net.d(b).socket(), &net_opts(), None, Some(blob))
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert!(loaded.is_err(), "{what}: accepted");
    }
    let log = net.d(b).log();
    assert!(
        log.contains("device state load failed, nothing applied"),
        "{log}"
    );
    // The last refused blob asked for promiscuous off: b stays promiscuous.
    let bases = drv
        .dev
        .queues
        .iter()
        .map(|q| q.used_idx().unwrap())
        .collect();
    let carried = Carried {
        parts: take_parts(&mut drv.dev),
        bases,
    };
    let (dev, loaded) = bring_up_loading(
        net.d(b).socket(),
        &net_opts(),
        Some(carried),
        Some(&cases[6].1),
    )
    .expect("bring-up");
    assert!(loaded.is_err());
    drv.dev = dev;
    net.kill(0);
    let got = filtered(&net, &mut drv);
    assert!(got.contains(&OTHER), "a refused state was applied: {got:?}");
    // A corrupt state section: the next daemon warns and starts promiscuous.
    let off = section_offset(&drv.dev);
    let f = &drv.dev.inflight.as_ref().expect("inflight").file;
    f.write_all_at(&[0xee; 256], off + 64 + 64).expect("write");
    f.write_all_at(&[0xee; 256], off + 64 + SLOT_LEN + 64)
        .expect("write");
    net.kill(b);
    let c = net.start(2);
    reconnect_after_crash(&mut drv.dev, net.d(c).socket(), &net_opts()).expect("reconnect");
    assert!(
        net.d(c).log().contains("device state is unusable"),
        "{}",
        net.d(c).log()
    );
    let got = filtered(&net, &mut drv);
    assert!(
        got.contains(&OTHER),
        "defaults after a corrupt section: {got:?}"
    );
}

/// Restarts every ring of `drv` where [`stop_all`] left it, as a source
/// QEMU does when a migration fails after it stopped the device.
fn resume(drv: &mut NetDriver, bases: &[u16]) {
    for (i, &b) in bases.iter().enumerate() {
        drv.dev.start_queue(i, b).expect("restart the ring");
    }
}

/// The device state in a live migration's order (QEMU 10 moves
/// vhost-user-net's state so; `qemu_migrate.rs` runs it with QEMU), the kit
/// as the frontend on both sides: the source's rings stop and its state is
/// saved; the destination's daemon gets it right after the protocol
/// features, before SET_FEATURES, and checks it then. A hostile state fails
/// CHECK_DEVICE_STATE and the source, its rings restarted where they
/// stopped, serves on with its filter; a good one holds on the destination
/// once the rings start; one saved under other features than the
/// destination's driver then acks is dropped at SET_FEATURES, with a
/// warning, for the defaults.
#[test]
fn net_state_moves_in_a_migrations_order_and_a_refused_load_leaves_the_source_serving() {
    if skip_if(
        "net_state_moves_in_a_migrations_order_and_a_refused_load_leaves_the_source_serving",
        netns::unavailable(),
    ) {
        return;
    }
    let mut net = Net::new(1, 2);
    let mut drv = NetDriver::connect(net.d(0).socket(), &net_opts()).expect("bring-up");
    configure_net(&mut drv);
    let bases = stop_all(&mut drv.dev).expect("stop the source");
    let good = save(&drv.dev.frontend).expect("save");
    let payload = bstate::decode(DeviceType::Net, &good)
        .expect("good")
        .to_vec();
    let pack = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = payload.clone();
        f(&mut p);
        bstate::encode(DeviceType::Net, &p).expect("encode")
    };
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        (
            "a feature the daemon does not offer",
            pack(&|p| p[7] |= 0x40),
        ),
        ("another MAC", pack(&|p| p[17] ^= 1)),
        (
            "more pairs than the daemon has",
            pack(&|p| p[9..11].copy_from_slice(&9u16.to_le_bytes())),
        ),
        ("a truncated table", pack(&|p| p.truncate(p.len() - 3))),
        ("garbage", (0..200u32).map(|i| (i * 31) as u8).collect()),
    ];
    let b = net.start(2);
    for (what, blob) in &hostile {
        let (_d, loaded) = bring_up_migrating(net.d(b).socket(), &net_opts(), None, Some(blob))
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert!(
            matches!(loaded, Err(StateError::Refused("CHECK_DEVICE_STATE", _))),
            "{what}: {loaded:?}"
        );
    }
    assert!(net.d_mut(b).is_running(), "the destination died");
    assert!(
        net.d(b)
            .log()
            .contains("device state load failed, nothing applied"),
        "{}",
        net.d(b).log()
    );
    // The migration failed: its destination goes, the source resumes.
    net.kill(b);
    resume(&mut drv, &bases);
    assert_eq!(
        filtered(&net, &mut drv),
        expected_accepted(),
        "the source after a refused load"
    );

    // Now the move: the state reaches the destination before its features.
    let bases = stop_all(&mut drv.dev).expect("stop the source");
    let blob = save(&drv.dev.frontend).expect("save");
    let c = net.start(2);
    let carried = Carried {
        parts: take_parts(&mut drv.dev),
        bases,
    };
    let (dev, loaded) =
        bring_up_migrating(net.d(c).socket(), &net_opts(), Some(carried), Some(&blob))
            .expect("destination bring-up");
    loaded.expect("the destination refused the state");
    drv.dev = dev;
    net.kill(0);
    assert_eq!(
        filtered(&net, &mut drv),
        expected_accepted(),
        "on the destination"
    );
    let log = net.d(c).log();
    assert!(
        log.contains("applied when it sets the features")
            && log.contains("device state from the frontend applied"),
        "{log}"
    );

    // Saved under EVENT_IDX, the next destination's driver acks without it:
    // the state passed CHECK_DEVICE_STATE (features this daemon offers) and
    // is dropped at SET_FEATURES: defaults, promiscuous.
    let bases = stop_all(&mut drv.dev).expect("stop");
    let blob = save(&drv.dev.frontend).expect("save");
    let d = net.start(2);
    let carried = Carried {
        parts: take_parts(&mut drv.dev),
        bases,
    };
    let opts = net_opts().event_idx(false);
    let (dev, loaded) = bring_up_migrating(net.d(d).socket(), &opts, Some(carried), Some(&blob))
        .expect("destination bring-up");
    loaded.expect("CHECK_DEVICE_STATE");
    drv.dev = dev;
    net.kill(c);
    let log = net.d(d).log();
    assert!(log.contains("dropped at SET_FEATURES"), "{log}");
    for pair in 0..drv.pairs {
        drv.post_rx(pair, 32, 2048).expect("post rx");
    }
    let got = filtered(&net, &mut drv);
    assert!(got.contains(&OTHER), "not the defaults: {got:?}");
}
