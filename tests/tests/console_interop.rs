//! The shared console suite against rust-vmm's `vhost-device-console`
//! (network backend on a TCP port of 127.0.0.1), in the same run as the
//! suite against `bulkhead-console`.
//!
//! The subset both support: VERSION_1, MULTIPORT with one port, EVENT_IDX,
//! INDIRECT_DESC; Linux's probe sequence; guest output (printable ASCII:
//! vhost-device-console 0.1.0 panics on output that is not UTF-8) and host
//! input typed one byte at a time (0.1.0 publishes one used entry per byte
//! received, for the same head, so a driver must not let several bytes
//! queue up; it also drops the receive buffers it takes while it has no
//! input, which a Linux-like driver survives by re-posting each used buffer).
//! SIZE, EMERG_WRITE, named ports and the backend-request channel are
//! bulkhead-console only.
//!
//! CI installs the binary (`.ci/install-deps`); a missing binary fails the
//! test rather than skipping it.

use std::time::Duration;

use bulkhead_tests::console::{
    ConsoleDaemon, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE, ascii_pattern, suite,
    vhost_device_console_binary,
};

fn binary() -> std::path::PathBuf {
    vhost_device_console_binary().unwrap_or_else(|| {
        panic!(
            "vhost-device-console not found: run .ci/install-deps (it runs \
             `cargo install vhost-device-console --locked --root target/tools`) or set \
             BULKHEAD_VHOST_DEVICE_CONSOLE"
        )
    })
}

fn run_suite(d: &ConsoleDaemon) -> f64 {
    let mut drv = suite::linux_console_bring_up(d);
    assert!(drv.multiport);
    assert_eq!(drv.config.max_nr_ports, 1);
    let c = d.console.connect().expect("host client");
    // Let the backend accept the client before the first byte of output.
    std::thread::sleep(Duration::from_millis(200));
    let data = ascii_pattern(42, 2 << 20);
    let (mut c, rate) = suite::output_is_byte_exact(c, &mut drv, &data);
    suite::typed_input_reaches_the_guest(c.as_mut(), &mut drv, b"uname -a\n");
    rate
}

#[test]
fn vhost_device_console_passes_the_shared_suite() {
    let bin = binary();
    let d = ConsoleDaemon::vhost_device_console(&bin).expect("start vhost-device-console");
    let rate = run_suite(&d);
    println!("vhost-device-console: guest->host {rate:.1} MiB/s");
}

#[test]
fn bulkhead_console_passes_the_shared_suite() {
    let d = ConsoleDaemon::bulkhead(&[])
        .expect("start bulkhead-console (run `cargo build -p bulkhead-console`)");
    let rate = run_suite(&d);
    println!("bulkhead-console: guest->host {rate:.1} MiB/s");
}

#[test]
fn vhost_device_console_offers_the_common_subset() {
    let d = ConsoleDaemon::vhost_device_console(&binary()).expect("start vhost-device-console");
    let drv = bulkhead_tests::console::ConsoleDriver::connect(
        d.socket(),
        &bulkhead_tests::frontend::Options::default(),
    )
    .expect("bring-up");
    assert!(drv.dev.offered_features & VIRTIO_CONSOLE_F_MULTIPORT != 0);
    // Not offered by 0.1.0: the suite does not use it.
    assert!(drv.dev.offered_features & VIRTIO_CONSOLE_F_SIZE == 0);
    assert_eq!(drv.dev.queue_num, 4);
}
