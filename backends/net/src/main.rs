//! `bulkhead-net`: a vhost-user net device backend on a tap device.

use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_common::cli::BusyPollArgs;
use bulkhead_common::scaffold::{self, Backend, BackendArgs, Program, StartError};
use clap::Parser;

use bulkhead_net::device::{NetConfig, NetDevice};
use bulkhead_net::policy;
use bulkhead_net::request::MacAddr;
use bulkhead_net::tap::Tap;

/// A ring size the device can run: a power of two up to 32768 (the
/// virtio maximum; `common::virtqueue::MAX_QUEUE_SIZE`).
fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{e}"))?;
    if n == 0 || !n.is_power_of_two() || n > bulkhead_common::virtqueue::MAX_QUEUE_SIZE {
        return Err(format!(
            "must be a power of two from 1 to {}",
            bulkhead_common::virtqueue::MAX_QUEUE_SIZE
        ));
    }
    Ok(n)
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    MacAddr::parse_unicast(s)
}

/// vhost-user net device backend: connects a virtio-net driver, through any
/// vhost-user frontend (QEMU, Cloud Hypervisor, crosvm, bulkhead-vmm, DPDK
/// virtio-user), to a tap device on the host.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-net", version, after_help = scaffold::EXIT_STATUS_HELP)]
struct Args {
    #[command(flatten)]
    backend: BackendArgs,

    #[command(flatten)]
    busy_poll: BusyPollArgs,

    /// Tap interface to open by name, created if absent (needs CAP_NET_ADMIN to create).
    #[arg(long, value_name = "NAME", conflicts_with = "tap_fd",
          required_unless_present_any = ["print_capabilities", "tap_fd"])]
    tap: Option<String>,

    /// Inherited tap queue fd opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; repeat once per queue pair.
    #[arg(long, value_name = "N")]
    tap_fd: Vec<RawFd>,

    /// MAC address offered to the driver (VIRTIO_NET_F_MAC); the driver picks one otherwise.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<MacAddr>,

    /// MTU offered to the driver (VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(68..))]
    mtu: Option<u16>,

    /// Queue pairs (rx+tx, one tap queue each); default: the number of --tap-fd, or 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    queue_pairs: Option<u16>,

    /// Largest virtqueue size the frontend may set (a power of two up to
    /// 32768); every smaller power of two works too.
    #[arg(long, value_name = "N", default_value = "1024", value_parser = parse_queue_size)]
    queue_size: u16,
}

/// The tap queues: inherited fds, or opened by name. A --queue-pairs that
/// disagrees with the fds is a usage error; fds that are no tap fail.
fn open_taps(args: &Args) -> Result<(Vec<Tap>, u16), StartError> {
    let failed = StartError::Failed;
    if !args.tap_fd.is_empty() {
        let n = u16::try_from(args.tap_fd.len())
            .map_err(|_| StartError::Usage("too many --tap-fd".into()))?;
        if let Some(p) = args.queue_pairs
            && p != n
        {
            return Err(StartError::Usage(format!(
                "--queue-pairs {p} but {n} --tap-fd given"
            )));
        }
        let taps = args
            .tap_fd
            .iter()
            .map(|&fd| Tap::from_raw_fd(fd).map_err(|e| failed(format!("--tap-fd {fd}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if n > 1 && taps.iter().any(|t| !t.is_multi_queue()) {
            return Err(failed(
                "several --tap-fd need a tap opened with IFF_MULTI_QUEUE".into(),
            ));
        }
        if taps.iter().any(|t| t.name() != taps[0].name()) {
            return Err(failed(
                "every --tap-fd must be a queue of the same tap".into(),
            ));
        }
        return Ok((taps, n));
    }
    let name = args
        .tap
        .as_deref()
        .ok_or_else(|| StartError::Usage("--tap or --tap-fd is required".into()))?;
    let pairs = args.queue_pairs.unwrap_or(1);
    let taps = Tap::open_queues(name, pairs)
        .map_err(|e| failed(format!("cannot open tap {name}: {e}")))?;
    Ok((taps, pairs))
}

const PROGRAM: Program = Program {
    name: "bulkhead-net",
    device_type: "net",
    // QEMU's vhost-user.json defines no features for this type.
    capabilities: &[],
};

/// Opens the tap queues and builds the device (before the sandbox).
fn build(args: &Args) -> Result<Backend<NetDevice>, StartError> {
    let (taps, pairs) = open_taps(args)?;
    let cfg = NetConfig {
        mac: args.mac,
        mtu: args.mtu,
        queue_pairs: pairs,
        queue_size: args.queue_size,
    };
    let device = NetDevice::new(cfg, taps)
        .map_err(|e| StartError::Failed(format!("cannot set up the tap: {e}")))?;
    log::info!(
        "serving tap {} ({pairs} queue pair(s) of up to {} entries{}{})",
        device.tap_name(),
        args.queue_size,
        args.mac.map(|m| format!(", mac {m}")).unwrap_or_default(),
        args.mtu.map(|m| format!(", mtu {m}")).unwrap_or_default(),
    );
    let mut backend = Backend::new(Arc::new(device), policy::policy(pairs, args.queue_size));
    backend.busy_poll = args.busy_poll.max();
    Ok(backend)
}

fn main() -> ExitCode {
    if let Some(code) = scaffold::capabilities_if_asked(&PROGRAM) {
        return code;
    }
    let args = Args::parse();
    scaffold::run(&PROGRAM, &args.backend, || build(&args))
}
