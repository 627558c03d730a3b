//! `bulkhead-net`: a vhost-user net device backend on a tap device.

use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_common::scaffold::{self, Backend, Program, StartError};
use bulkhead_common::throttle_group::GroupKind;
use clap::Parser;

use bulkhead_net::cli::Args;
use bulkhead_net::device::{NetConfig, NetDevice};
use bulkhead_net::policy;
use bulkhead_net::tap::Tap;

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
    let limits = args.limits.limits().map_err(StartError::Usage)?;
    let throttle = args
        .throttle_group
        .throttle(GroupKind::Net, limits)
        .map_err(StartError::Usage)?;
    let limits = throttle.limits();
    if limits.any() {
        log::info!(
            "limits: rx {} pps {} B/s, tx {} pps {} B/s (0: none)",
            limits.iops_read.rate,
            limits.bps_read.rate,
            limits.iops_write.rate,
            limits.bps_write.rate
        );
    }
    let device = NetDevice::new(cfg, taps)
        .map_err(|e| StartError::Failed(format!("cannot set up the tap: {e}")))?
        .with_throttle(Arc::new(throttle));
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
    // Refused before anything starts, `--check` included.
    if let Err(e) = args.limits.limits() {
        eprintln!("bulkhead-net: {e}");
        return ExitCode::from(scaffold::EXIT_USAGE);
    }
    scaffold::run(&PROGRAM, &args.backend, || build(&args))
}
