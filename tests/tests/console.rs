//! Integration tests of the real `bulkhead-console` process, driven by the
//! test kit's virtio-console driver (which replays Linux's driver).
//!
//! Run `cargo build -p bulkhead-console` first: the tests start the binary
//! next to the test executable (or `$BULKHEAD_BIN_BULKHEAD_CONSOLE`).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_tests::console::{
    BAD_ID, CONSOLE_PORT, CTRL_RX, CTRL_TX, ConsoleDaemon, ConsoleDriver, DEVICE_READY, HostAddr,
    HostConn, PAGE, PORT_ADD, PORT_NAME, PORT_OPEN, PORT_READY, RESIZE, TIMEOUT,
    VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE, ascii_pattern,
    binary_pattern, control, ctl_command, read_n, suite,
};
use bulkhead_tests::frontend::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::virtq::Buf;
use vhost::vhost_user::VhostUserProtocolFeatures;

const LOG_PORT: &str = "org.example.log";

fn start(args: &[&str]) -> ConsoleDaemon {
    ConsoleDaemon::bulkhead(args)
        .expect("start bulkhead-console (run `cargo build -p bulkhead-console`)")
}

fn console_path(d: &ConsoleDaemon) -> PathBuf {
    d.dir().join("vhost.sock.console")
}

fn ctl(d: &ConsoleDaemon) -> PathBuf {
    d.dir().join("vhost.sock.console.ctl")
}

fn connect(d: &ConsoleDaemon) -> ConsoleDriver {
    ConsoleDriver::connect(d.socket(), &ConsoleDriver::options()).expect("vhost-user bring-up")
}

fn up(d: &ConsoleDaemon) -> ConsoleDriver {
    let mut drv = connect(d);
    drv.linux_bring_up(&[None]).expect("Linux bring-up");
    drv
}

fn client(path: &Path) -> Box<dyn HostConn> {
    HostAddr::Unix(path.to_path_buf())
        .connect()
        .expect("host client")
}

fn stats(d: &ConsoleDaemon) -> serde_json::Value {
    let line = ctl_command(&ctl(d), "stats").expect("stats");
    serde_json::from_str(&line).expect("stats JSON")
}

/// Waits until the daemon has attached a client (the scrollback goes to it first).
fn wait_attached(d: &ConsoleDaemon, n: u64) {
    let deadline = Instant::now() + TIMEOUT;
    while stats(d)["attaches"].as_u64() < Some(n) {
        assert!(Instant::now() < deadline, "client never attached");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh connection still brings the console up and moves bytes both ways.
fn assert_still_serving(d: &mut ConsoleDaemon) {
    assert!(d.is_running(), "bulkhead-console died");
    let mut drv = up(d);
    let mut c = client(&console_path(d));
    wait_attached(d, 1);
    drv.write(0, b"alive?", 64).unwrap();
    assert_eq!(read_n(c.as_mut(), 6, TIMEOUT).unwrap(), b"alive?");
    c.write_all(b"yes").unwrap();
    assert_eq!(drv.read(0, 3, TIMEOUT).unwrap(), b"yes");
}

#[test]
fn offers_the_documented_features_queues_and_config() {
    let d = start(&["--port", &format!("name={LOG_PORT}")]);
    let mut drv = connect(&d);
    let offered = drv.dev.offered_features;
    for (name, bit) in [
        ("VERSION_1", VIRTIO_F_VERSION_1),
        ("SIZE", VIRTIO_CONSOLE_F_SIZE),
        ("MULTIPORT", VIRTIO_CONSOLE_F_MULTIPORT),
        ("EMERG_WRITE", VIRTIO_CONSOLE_F_EMERG_WRITE),
        ("EVENT_IDX", VIRTIO_RING_F_EVENT_IDX),
        ("INDIRECT_DESC", VIRTIO_RING_F_INDIRECT_DESC),
    ] {
        assert!(offered & bit != 0, "{name} not offered");
    }
    let p = drv.dev.offered_protocol;
    for f in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::BACKEND_REQ,
    ] {
        assert!(p.contains(f), "{f:?} not offered");
    }
    // Two ports: rx/tx of port 0, the control pair, rx/tx of port 1.
    assert_eq!(drv.dev.queue_num, 6);
    let cfg = drv.read_config().unwrap();
    assert_eq!(cfg.max_nr_ports, 2);
    assert_eq!(cfg.emerg_wr, 0);
}

#[test]
fn shared_suite_passes_against_bulkhead_console() {
    let d = start(&[]);
    let mut drv = suite::linux_console_bring_up(&d);
    let c = d.console.connect().unwrap();
    wait_attached(&d, 1);
    let data = ascii_pattern(1, 2 << 20);
    let (mut c, _) = suite::output_is_byte_exact(c, &mut drv, &data);
    suite::typed_input_reaches_the_guest(c.as_mut(), &mut drv, b"echo hello\n");
}

#[test]
fn output_and_input_are_byte_exact_over_several_mib() {
    let d = start(&[]);
    let mut drv = up(&d);
    let c = client(&console_path(&d));
    wait_attached(&d, 1);
    let out = binary_pattern(7, 8 << 20);
    let (c, out_rate) = suite::output_is_byte_exact(c, &mut drv, &out);

    let input = binary_pattern(8, 8 << 20);
    let to_send = input.clone();
    // The host writer runs in its own thread on a second handle of the client socket.
    let mut s = unsafe_dup(c.fd());
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || s.write_all(&to_send).unwrap());
    let got = drv.read(0, input.len(), Duration::from_secs(120)).unwrap();
    let in_rate = (input.len() as f64 / (1 << 20) as f64) / t0.elapsed().as_secs_f64();
    writer.join().unwrap();
    assert_eq!(got.len(), input.len(), "short input");
    assert!(got == input, "input differs");
    println!("console throughput: guest->host {out_rate:.1} MiB/s, host->guest {in_rate:.1} MiB/s");
    let s = stats(&d);
    assert_eq!(s["from_guest"].as_u64(), Some(out.len() as u64));
    assert_eq!(s["to_guest"].as_u64(), Some(input.len() as u64));
    assert_eq!(drv.unknown_used, 0);
}

/// A second handle on a socket fd, for a writer thread.
fn unsafe_dup(fd: i32) -> UnixStream {
    use std::os::fd::{BorrowedFd, OwnedFd};
    // SAFETY: fd is a live socket owned by the caller for the duration of this call.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let o: OwnedFd = b.try_clone_to_owned().expect("dup");
    let s = UnixStream::from(o);
    s.set_nonblocking(false).unwrap();
    s
}

#[test]
fn resize_updates_config_sends_resize_and_notifies_the_frontend() {
    let d = start(&[]);
    let mut drv = connect(&d);
    drv.attach_channel().unwrap();
    drv.linux_bring_up(&[None]).unwrap();
    assert_eq!(ctl_command(&ctl(&d), "size").unwrap(), "unknown");
    assert_eq!(ctl_command(&ctl(&d), "resize 120 40").unwrap(), "ok");
    let ch = drv.channel.take().unwrap();
    assert!(ch.wait(TIMEOUT), "no config-change notification");
    let cfg = drv.read_config().unwrap();
    assert_eq!((cfg.cols, cfg.rows), (120, 40));
    drv.settle(TIMEOUT, |d| d.ports[0].size == Some((120, 40)))
        .expect("RESIZE control message");
    let resize = drv
        .received
        .iter()
        .rev()
        .find(|e| e.event == RESIZE)
        .unwrap();
    // The spec's { cols, rows } after the header.
    assert_eq!(&resize.payload[..4], &[120, 0, 40, 0]);
    assert_eq!(ctl_command(&ctl(&d), "size").unwrap(), "120 40");
    // The same size again is not a change.
    assert_eq!(ctl_command(&ctl(&d), "resize 120 40").unwrap(), "ok");
    assert_eq!(
        ctl_command(&ctl(&d), "resize 0 40")
            .unwrap()
            .split(':')
            .next(),
        Some("error")
    );
    assert_eq!(ctl_command(&ctl(&d), "resize 100 30").unwrap(), "ok");
    assert!(ch.wait(TIMEOUT));
    assert_eq!(ch.count(), 2);
    assert_eq!(stats(&d)["device"]["config_changes"].as_u64(), Some(2));
}

#[test]
fn single_port_driver_reads_the_size_from_config_after_a_change() {
    let d = start(&[]);
    let opts = ConsoleDriver::options().feature(VIRTIO_CONSOLE_F_MULTIPORT, false);
    let mut drv = ConsoleDriver::connect(d.socket(), &opts).unwrap();
    assert!(!drv.multiport);
    drv.attach_channel().unwrap();
    drv.linux_bring_up(&[None]).unwrap();
    assert_eq!(ctl_command(&ctl(&d), "resize 132 43").unwrap(), "ok");
    assert!(drv.channel.as_ref().unwrap().wait(TIMEOUT));
    let cfg = drv.read_config().unwrap();
    assert_eq!((cfg.cols, cfg.rows), (132, 43));
    // Port 0 works without any control message.
    let mut c = client(&console_path(&d));
    wait_attached(&d, 1);
    drv.write(0, b"no multiport", 64).unwrap();
    assert_eq!(read_n(c.as_mut(), 12, TIMEOUT).unwrap(), b"no multiport");
    c.write_all(b"in").unwrap();
    assert_eq!(drv.read(0, 2, TIMEOUT).unwrap(), b"in");
}

#[test]
fn named_port_is_added_named_opened_and_carries_data() {
    let d = start(&["--port", &format!("name={LOG_PORT}")]);
    let mut drv = connect(&d);
    drv.linux_bring_up(&[None, Some(LOG_PORT)]).unwrap();
    let p1 = drv.ports[1].clone();
    assert!(p1.added && p1.host_open && !p1.console, "{p1:?}");
    assert_eq!(p1.name.as_deref(), Some(LOG_PORT));
    let ev_for = |id: u32| -> Vec<u16> {
        drv.received
            .iter()
            .filter(|e| e.id == id)
            .map(|e| e.event)
            .collect()
    };
    assert_eq!(ev_for(0), vec![PORT_ADD, CONSOLE_PORT, PORT_OPEN]);
    assert_eq!(ev_for(1), vec![PORT_ADD, PORT_NAME, PORT_OPEN]);
    // Input is held until a guest process opens the port.
    let path = d.dir().join(format!("vhost.sock.{LOG_PORT}"));
    let mut c = client(&path);
    c.write_all(b"early").unwrap();
    assert!(
        drv.read(1, 5, Duration::from_millis(300))
            .unwrap()
            .is_empty()
    );
    drv.open_port(1).unwrap();
    assert_eq!(drv.read(1, 5, TIMEOUT).unwrap(), b"early");
    drv.write(1, b"log line\n", 4096).unwrap();
    assert_eq!(read_n(c.as_mut(), 9, TIMEOUT).unwrap(), b"log line\n");
    // Port 0 is separate.
    let mut c0 = client(&console_path(&d));
    drv.write(0, b"console", 64).unwrap();
    assert_eq!(read_n(c0.as_mut(), 7, TIMEOUT).unwrap(), b"console");
}

#[test]
fn emergency_write_goes_to_the_console_even_before_the_driver_negotiated_it() {
    let d = start(&[]);
    // A driver that never acknowledged EMERG_WRITE: the spec lets an early
    // console write emerg_wr without negotiating the feature.
    let mut opts = ConsoleDriver::options();
    opts.features &= !VIRTIO_CONSOLE_F_EMERG_WRITE;
    let mut early = ConsoleDriver::connect(d.socket(), &opts).expect("vhost-user bring-up");
    assert!(!early.dev.has_feature(VIRTIO_CONSOLE_F_EMERG_WRITE));
    let mut c = client(&console_path(&d));
    wait_attached(&d, 1);
    early.emerg_write(b'!').unwrap();
    assert_eq!(read_n(c.as_mut(), 1, TIMEOUT).unwrap(), b"!");
    drop(early);
    let mut drv = up(&d);
    let mut c = client(&console_path(&d));
    wait_attached(&d, 1);
    for b in b"SOS" {
        drv.emerg_write(*b).unwrap();
    }
    assert_eq!(read_n(c.as_mut(), 3, TIMEOUT).unwrap(), b"SOS");
    assert_eq!(stats(&d)["device"]["emerg_writes"].as_u64(), Some(4));
    // Other config offsets are read-only: the write is refused, and the
    // connection goes on (a guest writing config space must not make its
    // VMM reconnect).
    assert!(drv.dev.set_config(0, &[1, 0]).is_err());
    drv.emerg_write(b'!').unwrap();
    assert_eq!(read_n(c.as_mut(), 1, TIMEOUT).unwrap(), b"!");
    assert_eq!(stats(&d)["device"]["emerg_writes"].as_u64(), Some(5));
}

#[test]
fn detach_and_reattach_replays_the_scrollback() {
    let d = start(&["--scrollback", "1024"]);
    let mut drv = up(&d);
    let mut a = client(&console_path(&d));
    wait_attached(&d, 1);
    drv.write(0, b"first\n", 64).unwrap();
    assert_eq!(read_n(a.as_mut(), 6, TIMEOUT).unwrap(), b"first\n");
    drop(a);
    // Output while nobody is attached: the oldest bytes beyond 1024 are dropped.
    let data = ascii_pattern(3, 5000);
    drv.write(0, &data, 700).unwrap();
    drv.flush(0, TIMEOUT).unwrap();
    let mut b = client(&console_path(&d));
    let got = read_n(b.as_mut(), 1024, TIMEOUT).unwrap();
    assert_eq!(got, &data[data.len() - 1024..]);
    drv.write(0, b"live\n", 64).unwrap();
    assert_eq!(read_n(b.as_mut(), 5, TIMEOUT).unwrap(), b"live\n");
    let s = stats(&d);
    assert_eq!(s["attaches"].as_u64(), Some(2));
    assert_eq!(s["dropped"].as_u64(), Some(5000 - 1024));
}

#[test]
fn a_client_that_stops_reading_stalls_neither_the_guest_nor_memory() {
    let d = start(&[]);
    let mut drv = up(&d);
    let mut c = client(&console_path(&d));
    wait_attached(&d, 1);
    let rss0 = d.rss_kib().unwrap();
    let data = binary_pattern(11, 32 << 20);
    let t0 = Instant::now();
    drv.write(0, &data, PAGE as usize).unwrap();
    drv.flush(0, Duration::from_secs(60))
        .expect("guest transmit stalled behind a client that does not read");
    let secs = t0.elapsed().as_secs_f64();
    let rss1 = d.rss_kib().unwrap();
    assert!(
        rss1 < rss0 + 8 * 1024,
        "daemon grew from {rss0} KiB to {rss1} KiB"
    );
    // The client now reads: what the socket buffer held, then the newest scrollback.
    let got = read_n(c.as_mut(), data.len(), Duration::from_secs(2)).unwrap();
    assert!(got.len() < data.len() / 4, "got {} bytes", got.len());
    let tail = 16 << 10;
    assert_eq!(&got[got.len() - tail..], &data[data.len() - tail..]);
    assert!(stats(&d)["dropped"].as_u64().unwrap() > 0);
    println!("32 MiB to a stuck client in {secs:.2} s; RSS {rss0} -> {rss1} KiB");
}

#[test]
fn host_input_waits_for_guest_buffers() {
    let d = start(&[]);
    let mut drv = up(&d);
    let c = client(&console_path(&d));
    wait_attached(&d, 1);
    let posted = drv.posted_rx(0);
    assert!(posted > 0);
    let rss0 = d.rss_kib().unwrap();
    let input = binary_pattern(5, 16 << 20);
    let to_send = input.clone();
    let mut s = unsafe_dup(c.fd());
    let writer = std::thread::spawn(move || {
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(&to_send).unwrap();
    });
    // The guest does not take any buffer back: the daemon fills the posted
    // ones and then stops reading.
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !writer.is_finished(),
        "16 MiB went nowhere: no back-pressure"
    );
    let rss1 = d.rss_kib().unwrap();
    assert!(
        rss1 < rss0 + 8 * 1024,
        "daemon grew from {rss0} KiB to {rss1} KiB"
    );
    let got = drv.read(0, input.len(), Duration::from_secs(120)).unwrap();
    writer.join().unwrap();
    assert!(
        got == input,
        "input differs ({} of {} bytes)",
        got.len(),
        input.len()
    );
    drop(c);
}

#[test]
fn malformed_control_messages_and_chains_are_counted_and_serving_goes_on() {
    let mut d = start(&[]);
    let mut drv = up(&d);
    // Short, unknown event, device-only event, no such port, bad value.
    drv.send_control_raw(&[1, 2, 3, 4]).unwrap();
    drv.send_control(0, 99, 0).unwrap();
    drv.send_control(0, RESIZE, 0).unwrap();
    drv.send_control(7, PORT_OPEN, 1).unwrap();
    drv.send_control(0, PORT_OPEN, 9).unwrap();
    // A control chain with only a writable buffer.
    let gpa = drv.dev.mem.alloc(64, 64).unwrap();
    let q = &mut drv.dev.queues[CTRL_TX];
    q.submit(&[Buf::writable(gpa, 64)], false).unwrap();
    q.wait_used(TIMEOUT).unwrap();
    // A control chain pointing outside guest memory (refused by validation).
    q.submit(&[Buf::readable(1 << 40, 8)], false).unwrap();
    q.wait_used(TIMEOUT).unwrap();
    // A repeated DEVICE_READY and PORT_READY are harmless.
    drv.send_control(BAD_ID, DEVICE_READY, 1).unwrap();
    drv.send_control(0, PORT_READY, 1).unwrap();
    let s = stats(&d);
    assert_eq!(s["device"]["malformed_control"].as_u64(), Some(6), "{s}");
    assert!(d.is_running());
    // The same connection still works.
    let mut c = client(&console_path(&d));
    wait_attached(&d, 1);
    drv.write(0, b"still here", 64).unwrap();
    assert_eq!(read_n(c.as_mut(), 10, TIMEOUT).unwrap(), b"still here");
    drop(c);
    drop(drv);
    assert_still_serving(&mut d);

    // A control receive buffer too small for a header is returned empty and
    // the message goes into the next buffer.
    let mut drv = connect(&d);
    drv.config = drv.read_config().unwrap();
    drv.ports = vec![Default::default()];
    let tiny = drv.dev.mem.alloc(4, 64).unwrap();
    let rq = &mut drv.dev.queues[CTRL_RX];
    let head = rq.add_chain(&[Buf::writable(tiny, 4)]).unwrap();
    rq.publish(head).unwrap();
    drv.fill_queue(CTRL_RX).unwrap();
    drv.send_control(BAD_ID, DEVICE_READY, 1).unwrap();
    drv.settle(TIMEOUT, |d| d.ports[0].host_open).unwrap();
    assert_eq!(stats(&d)["device"]["bad_buffers"].as_u64(), Some(1));
}

#[test]
fn linux_sequence_posts_control_buffers_before_device_ready() {
    // Replays the probe by hand and checks the device waits for DEVICE_READY.
    let d = start(&[]);
    let mut drv = connect(&d);
    drv.config = drv.read_config().unwrap();
    assert_eq!(drv.config.max_nr_ports, 1);
    drv.ports = vec![Default::default()];
    let n = drv.fill_queue(CTRL_RX).unwrap();
    assert_eq!(n, 128);
    // Nothing is sent before DEVICE_READY.
    assert!(
        drv.settle(Duration::from_millis(300), |d| !d.received.is_empty())
            .is_err()
    );
    drv.send_control(BAD_ID, DEVICE_READY, 1).unwrap();
    drv.settle(TIMEOUT, |d| d.ports[0].host_open).unwrap();
    let events: Vec<(u32, u16, u16)> = drv
        .received
        .iter()
        .map(|e| (e.id, e.event, e.value))
        .collect();
    assert_eq!(
        events,
        vec![(0, PORT_ADD, 1), (0, CONSOLE_PORT, 1), (0, PORT_OPEN, 1)]
    );
    assert!(drv.ports[0].console && drv.ports[0].guest_open);
    // The raw header helper matches what the driver sent.
    assert_eq!(control(BAD_ID, DEVICE_READY, 1)[..4], [0xff; 4]);
}

#[test]
fn reconnecting_frontend_gets_a_fresh_device_and_the_scrollback() {
    let d = start(&[]);
    {
        let mut drv = up(&d);
        drv.write(0, b"before reconnect\n", 64).unwrap();
        drv.flush(0, TIMEOUT).unwrap();
    }
    let mut drv = up(&d);
    let mut c = client(&console_path(&d));
    assert_eq!(
        read_n(c.as_mut(), 17, TIMEOUT).unwrap(),
        b"before reconnect\n"
    );
    c.write_all(b"x").unwrap();
    assert_eq!(drv.read(0, 1, TIMEOUT).unwrap(), b"x");
}

#[test]
fn help_capabilities_and_docs_agree() {
    let bin = workspace_binary("bulkhead-console");
    let caps = Command::new(&bin)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&caps.stdout).unwrap();
    assert_eq!(v["type"], "console");
    let help = Command::new(&bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console.md"))
            .expect("docs/console.md");
    for flag in [
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--console",
        "--port",
        "--scrollback",
        "--stats-socket",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(docs.contains(flag), "docs/console.md lacks {flag}");
    }
    // QEMU's vhost-user schema defines no console features.
    assert_eq!(v, serde_json::json!({ "type": "console" }));
    for word in [
        "resize COLS ROWS",
        "scrollback",
        "PATH.ctl",
        "malformed_control",
        "dropped",
        "config-change",
    ] {
        assert!(docs.contains(word), "docs/console.md lacks `{word}`");
    }
    assert!(help.contains("resize COLS ROWS"));
}

/// Input a client sent is not lost when a newer client replaces it (how a
/// console follower that reconnects lost 16 bytes typed on hvc0, issue 22):
/// the guest gets the replaced client's bytes first, then the new one's;
/// output goes only to the new client.
#[test]
fn input_of_a_replaced_client_still_reaches_the_guest() {
    let d = start(&["--port", &format!("name={LOG_PORT}")]);
    let mut drv = connect(&d);
    drv.linux_bring_up(&[None, Some(LOG_PORT)]).unwrap();
    let path = d.dir().join(format!("vhost.sock.{LOG_PORT}"));
    let attached = |n: u64| {
        let ctl = d.dir().join(format!("vhost.sock.{LOG_PORT}.ctl"));
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let line = ctl_command(&ctl, "stats").expect("stats");
            let v: serde_json::Value = serde_json::from_str(&line).expect("stats JSON");
            if v["attaches"].as_u64() >= Some(n) {
                break;
            }
            assert!(Instant::now() < deadline, "client never attached: {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut a = client(&path);
    attached(1);
    // The port is not open in the guest yet: the daemon has not read this.
    a.write_all(b"typed-by-a").unwrap();
    let mut b = client(&path);
    attached(2);
    b.write_all(b"+b").unwrap();
    drv.open_port(1).unwrap();
    assert_eq!(drv.read(1, 12, TIMEOUT).unwrap(), b"typed-by-a+b");
    drv.write(1, b"out", 64).unwrap();
    assert_eq!(read_n(b.as_mut(), 3, TIMEOUT).unwrap(), b"out");
    // The replaced client reads end of file: its output side is shut.
    a.timeout(Some(TIMEOUT)).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut *a, &mut byte).unwrap(), 0);
}

/// Input typed on hvc0 and on a named port at the same moment, each from a
/// fresh connection (the previous round's clients may not be noticed gone
/// yet, so they are replaced), reaches both ports byte for byte.
#[test]
fn input_typed_on_two_ports_at_the_same_moment_reaches_both() {
    let d = start(&["--port", &format!("name={LOG_PORT}")]);
    let mut drv = connect(&d);
    drv.linux_bring_up(&[None, Some(LOG_PORT)]).unwrap();
    drv.open_port(1).unwrap();
    let named = d.dir().join(format!("vhost.sock.{LOG_PORT}"));
    for round in 0..20u8 {
        let (p0, p1) = (console_path(&d), named.clone());
        let a = std::thread::spawn(move || {
            let mut c = client(&p0);
            c.write_all(&[b'a' + round % 26; 16]).unwrap();
            c
        });
        let b = std::thread::spawn(move || {
            let mut c = client(&p1);
            c.write_all(&[b'A' + round % 26; 16]).unwrap();
            c
        });
        let (_ca, _cb) = (a.join().unwrap(), b.join().unwrap());
        assert_eq!(
            drv.read(0, 16, TIMEOUT).unwrap(),
            vec![b'a' + round % 26; 16],
            "round {round} hvc0"
        );
        assert_eq!(
            drv.read(1, 16, TIMEOUT).unwrap(),
            vec![b'A' + round % 26; 16],
            "round {round} named"
        );
    }
}
