//! `bulkhead-blk`: a vhost-user block device backend serving a raw image file
//! or block device.

use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_common::cli::error_chain;
use bulkhead_common::scaffold::{self, Backend, Program, StartError};
use bulkhead_common::throttle::{Limits, Throttle};
use clap::Parser;

use bulkhead_blk::cli::{Args, EngineArg, FormatArg};
use bulkhead_blk::device::{BlkConfig, BlkDevice};
use bulkhead_blk::disk::{Disk, ImageOptions};
use bulkhead_blk::engine::{self, EngineKind};
use bulkhead_blk::image::FormatCheck;
use bulkhead_blk::policy;

const PROGRAM: Program = Program {
    name: "bulkhead-blk",
    device_type: "block",
    capabilities: &["read-only", "blk-file"],
};

/// Opens the image and builds the device (before the sandbox).
fn build(args: &Args) -> Result<Backend<BlkDevice>, StartError> {
    let opts = ImageOptions {
        readonly: args.readonly,
        direct: args.direct,
        format: match args.format {
            Some(FormatArg::Raw) => FormatCheck::Raw,
            None => FormatCheck::Probe,
        },
        lock: !args.no_lock,
    };
    let disk = match (&args.image, args.image_fd) {
        (Some(path), _) => Disk::open(path, opts),
        (None, Some(fd)) => {
            // SAFETY: the launcher handed us this fd to own.
            let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            Disk::from_fd_checked(f, fd, opts)
        }
        (None, None) => {
            return Err(StartError::Usage(
                "--image or --image-fd is required".into(),
            ));
        }
    }
    .map_err(|e| StartError::Failed(error_chain(&e)))?;
    let engine = match args.engine {
        EngineArg::IoUring if engine::io_uring_available() => EngineKind::IoUring,
        EngineArg::IoUring => {
            log::warn!("io_uring is not available here; using the sync engine");
            EngineKind::Sync
        }
        EngineArg::Sync => EngineKind::Sync,
    };
    log::info!(
        "serving {} ({} bytes, {} queue(s) of up to {}, {} engine{}{})",
        args.image
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("fd {}", args.image_fd.unwrap_or(-1))),
        disk.capacity,
        args.num_queues,
        args.queue_size,
        engine,
        if args.readonly { ", read-only" } else { "" },
        if args.direct { ", O_DIRECT" } else { "" },
    );
    let limits = args
        .limits
        .limits()
        .map_err(|e| StartError::Usage(e.to_string()))?;
    if limits.any() {
        log::info!("I/O limits: {}", describe(&limits));
    }
    let throttle = Throttle::new(limits).map_err(|e| StartError::Usage(e.to_string()))?;
    let device = Arc::new(
        BlkDevice::new(
            disk,
            BlkConfig {
                readonly: args.readonly,
                num_queues: args.num_queues,
                queue_size: args.queue_size,
                serial: args.serial.clone(),
                engine,
            },
        )
        .with_throttle(Arc::new(throttle)),
    );
    let mut backend = Backend::new(device, policy::policy(args.num_queues));
    backend.busy_poll = args.busy_poll.max();
    Ok(backend)
}

/// The limits that are set, as `iops-total=100 bps-read-max=1048576`.
fn describe(l: &Limits) -> String {
    let mut out = Vec::new();
    for (name, limit) in [
        ("iops-total", l.iops_total),
        ("iops-read", l.iops_read),
        ("iops-write", l.iops_write),
        ("bps-total", l.bps_total),
        ("bps-read", l.bps_read),
        ("bps-write", l.bps_write),
    ] {
        if limit.is_set() {
            out.push(format!("{name}={}", limit.rate));
            out.push(format!("{name}-max={}", limit.bucket()));
        }
    }
    out.join(" ")
}

fn main() -> ExitCode {
    if let Some(code) = scaffold::capabilities_if_asked(&PROGRAM) {
        return code;
    }
    let args = Args::parse();
    // Refused before anything starts, `--check` included.
    if let Err(e) = args.limits.limits() {
        eprintln!("bulkhead-blk: {e}");
        return ExitCode::from(scaffold::EXIT_USAGE);
    }
    scaffold::run(&PROGRAM, &args.backend, || build(&args))
}
