//! `bulkhead-net`: a vhost-user net device backend on a tap device.

use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_common::cli::{
    BusyPollArgs, VhostUserArgs, fail, init_logging, print_capabilities_if_asked,
};
use bulkhead_common::daemon::{Endpoint, serve_endpoint};
use bulkhead_common::sandbox::{Policy, Sandbox, SandboxArgs, Syscall, fd_budget};
use clap::Parser;

use bulkhead_net::device::{NetConfig, NetDevice, NetStats};
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
#[command(name = "bulkhead-net", version)]
struct Args {
    #[command(flatten)]
    vhost_user: VhostUserArgs,

    #[command(flatten)]
    sandbox: SandboxArgs,

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

/// Blocks SIGUSR1 in this thread and every thread it creates later; the
/// stats thread takes it with sigwait. Call it single-threaded, before the
/// socket exists, so an early SIGUSR1 never kills the daemon.
fn block_sigusr1() -> std::io::Result<libc::sigset_t> {
    // SAFETY: plain signal-mask calls on a zeroed sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(set)
    }
}

/// Logs the counters each time SIGUSR1 (blocked by [`block_sigusr1`]) arrives.
fn stats_on_sigusr1(set: libc::sigset_t, stats: Arc<NetStats>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait on a valid set, writing the signal number into `sig`.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    log::info!("stats: {}", stats.line());
                }
            }
        })?;
    Ok(())
}

/// Fds one queue holds beyond the tap: kick, call, err, stop, epoll, spare.
const FDS_PER_QUEUE: u64 = 8;

/// What bulkhead-net needs once it serves: its tap queues are open fds, so
/// no path at all, and no network either (a fresh, empty net namespace: the
/// tap fds keep carrying frames of the tap's own namespace). The main thread
/// sets the tap's vnet header size and offloads when the driver acks its
/// features, and attaches a pair's tap queue when its first queue starts; a
/// queue thread reads and writes frames, and detaches its pair's tap queue
/// when the last queue of the pair stops.
fn sandbox_policy(pairs: u16, queue_size: u16) -> Policy {
    use libc::*;
    Policy {
        paths: Vec::new(),
        main: vec![
            Syscall::ioctl(TUNSETOFFLOAD),
            Syscall::ioctl(TUNSETVNETHDRSZ),
            // The stats thread (sigwait).
            Syscall::any(SYS_rt_sigtimedwait),
        ],
        worker: vec![Syscall::ioctl(TUNSETQUEUE)],
        needs_network: false,
        // rx, tx per pair plus the control queue.
        max_open_files: fd_budget(2 * pairs + 1, FDS_PER_QUEUE),
        writes_files: false,
        // The inflight area (with its device-state section) is the one
        // file it sizes.
        memfd_bytes: bulkhead_common::inflight::max_area_size(2 * pairs + 1, queue_size, true),
    }
}

fn open_taps(args: &Args) -> Result<(Vec<Tap>, u16), String> {
    if !args.tap_fd.is_empty() {
        let n = u16::try_from(args.tap_fd.len()).map_err(|_| "too many --tap-fd")?;
        if let Some(p) = args.queue_pairs
            && p != n
        {
            return Err(format!("--queue-pairs {p} but {n} --tap-fd given"));
        }
        let taps = args
            .tap_fd
            .iter()
            .map(|&fd| Tap::from_raw_fd(fd).map_err(|e| format!("--tap-fd {fd}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if n > 1 && taps.iter().any(|t| !t.is_multi_queue()) {
            return Err("several --tap-fd need a tap opened with IFF_MULTI_QUEUE".into());
        }
        if taps.iter().any(|t| t.name() != taps[0].name()) {
            return Err("every --tap-fd must be a queue of the same tap".into());
        }
        return Ok((taps, n));
    }
    let name = args.tap.as_deref().ok_or("--tap or --tap-fd is required")?;
    let pairs = args.queue_pairs.unwrap_or(1);
    let taps = Tap::open_queues(name, pairs).map_err(|e| format!("cannot open tap {name}: {e}"))?;
    Ok((taps, pairs))
}

fn main() -> ExitCode {
    if let Some(code) = print_capabilities_if_asked("net", &[]) {
        return code;
    }
    let args = Args::parse();
    if args.vhost_user.check {
        return ExitCode::SUCCESS;
    }
    init_logging("bulkhead-net");
    if let Err(e) = args.vhost_user.require_socket() {
        log::error!("{e}");
        return ExitCode::from(2);
    }
    let (taps, pairs) = match open_taps(&args) {
        Ok(t) => t,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = NetConfig {
        mac: args.mac,
        mtu: args.mtu,
        queue_pairs: pairs,
        queue_size: args.queue_size,
    };
    let device = match NetDevice::new(cfg, taps) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            log::error!("cannot set up the tap: {e}");
            return ExitCode::FAILURE;
        }
    };
    log::info!(
        "serving tap {} ({pairs} queue pair(s) of up to {} entries{}{})",
        device.tap_name(),
        args.queue_size,
        args.mac.map(|m| format!(", mac {m}")).unwrap_or_default(),
        args.mtu.map(|m| format!(", mtu {m}")).unwrap_or_default(),
    );
    let sigusr1 = block_sigusr1();
    let endpoint = match Endpoint::open(&args.vhost_user) {
        Ok(e) => e.with_busy_poll(args.busy_poll.max()),
        Err(e) => return fail(&e),
    };
    if let Err(e) = Sandbox::enter(&args.sandbox, &sandbox_policy(pairs, args.queue_size)) {
        return fail(&e);
    }
    #[cfg(feature = "test-hooks")]
    bulkhead_common::test_hooks::run_from_env();
    if let Err(e) = sigusr1.and_then(|set| stats_on_sigusr1(set, device.stats.clone())) {
        log::warn!("no stats on SIGUSR1: {e}");
    }
    let result = serve_endpoint(endpoint, device.clone());
    log::info!("stats: {}", device.stats.line());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}
