//! `bulkhead-blk`: a vhost-user block device backend serving a raw image file
//! or block device.

use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_common::cli::error_chain;
use bulkhead_common::scaffold::{self, Backend, Program, StartError};
use bulkhead_common::throttle::Limits;
use bulkhead_common::throttle_group::GroupKind;
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
    if let Some((disk, at_exit)) = rbd_disk(args)? {
        let mut b = backend(args, disk, EngineKind::Rbd)?;
        b.at_exit = Some(at_exit);
        // librados' threads run already: confined by their own list.
        b.policy = policy::rbd_policy(args.num_queues);
        b.library_threads = Some(policy::librados_threads());
        return Ok(b);
    }
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
    backend(args, disk, engine)
}

/// What runs once serving ends.
type AtExit = Box<dyn FnOnce()>;

/// The RBD image `--image` names (None for a file), with the options that
/// do not apply to its kind refused: checked before anything starts,
/// `--check` included.
#[cfg(feature = "rbd")]
fn rbd_spec(args: &Args) -> Result<Option<bulkhead_blk::rbd::ImageSpec>, StartError> {
    use bulkhead_blk::rbd::ImageSpec;
    let Some(spec) = args.image.as_deref().and_then(ImageSpec::parse) else {
        refuse_rbd_options_for_a_file(args)?;
        return Ok(None);
    };
    let spec = spec.map_err(StartError::Usage)?;
    for (given, flag) in [
        (args.direct, "--direct"),
        (args.format.is_some(), "--format"),
        (args.no_lock, "--no-lock"),
    ] {
        if given {
            return Err(StartError::Usage(format!(
                "{flag} does not apply to an RBD image ({spec}; docs/blk.md)"
            )));
        }
    }
    Ok(Some(spec))
}

/// Without the `rbd` feature, `rbd:` images are refused.
#[cfg(not(feature = "rbd"))]
fn rbd_spec(args: &Args) -> Result<Option<std::convert::Infallible>, StartError> {
    match args.image.as_deref().and_then(|p| p.to_str()) {
        Some(s) if s.starts_with("rbd:") => Err(StartError::Usage(format!(
            "{s}: this bulkhead-blk was built without the rbd feature"
        ))),
        _ => refuse_rbd_options_for_a_file(args).map(|()| None),
    }
}

#[cfg(feature = "rbd")]
fn rbd_options(args: &Args) -> bulkhead_blk::rbd::RbdOptions {
    bulkhead_blk::rbd::RbdOptions {
        conf: args.ceph_conf.clone(),
        id: args.ceph_id.clone(),
        readonly: args.readonly,
        break_lock: args.break_lock,
    }
}

/// `--check` on an RBD image: connects, opens the image read-only and
/// says what a start would meet (size, whether a writer can lock it, who
/// holds the lock); an error is what the start would fail on.
#[cfg(feature = "rbd")]
fn check_rbd(args: &Args, spec: &bulkhead_blk::rbd::ImageSpec) -> Result<String, String> {
    bulkhead_blk::rbd::Image::probe(spec, &rbd_options(args)).map_err(|e| error_chain(&e))
}

/// The disk for `--image rbd:POOL/IMAGE` and what releases its lock at
/// exit, or None for a file.
#[cfg(feature = "rbd")]
fn rbd_disk(args: &Args) -> Result<Option<(Disk, AtExit)>, StartError> {
    use bulkhead_blk::rbd::Image;
    let Some(spec) = rbd_spec(args)? else {
        return Ok(None);
    };
    let opts = rbd_options(args);
    let image = Image::open(&spec, &opts).map_err(|e| StartError::Failed(error_chain(&e)))?;
    let image = Arc::new(image);
    let held = image.clone();
    // The device (and so the image) outlives serving: let go of the lock
    // here, so a successor after a clean stop needs no --break-lock.
    let at_exit: AtExit = Box::new(move || held.release_lock());
    Ok(Some((Disk::from_rbd(image), at_exit)))
}

/// Without the `rbd` feature, `rbd:` images are refused.
#[cfg(not(feature = "rbd"))]
fn rbd_disk(args: &Args) -> Result<Option<(Disk, AtExit)>, StartError> {
    rbd_spec(args).map(|_| None)
}

/// The RBD options make no sense for a file: refused, not ignored.
fn refuse_rbd_options_for_a_file(args: &Args) -> Result<(), StartError> {
    for (given, flag) in [
        (args.ceph_conf.is_some(), "--ceph-conf"),
        (args.ceph_id.is_some(), "--ceph-id"),
        (args.break_lock, "--break-lock"),
    ] {
        if given {
            return Err(StartError::Usage(format!(
                "{flag} applies only to an RBD image (--image rbd:POOL/IMAGE)"
            )));
        }
    }
    Ok(())
}

/// The device over `disk` with its I/O limits, and its sandbox policy.
fn backend(args: &Args, disk: Disk, engine: EngineKind) -> Result<Backend<BlkDevice>, StartError> {
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
    let throttle = args
        .throttle_group
        .throttle(GroupKind::Blk, limits)
        .map_err(StartError::Usage)?;
    if throttle.limits().any() {
        log::info!("I/O limits: {}", describe(&throttle.limits()));
    }
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
    let spec = match rbd_spec(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    #[cfg(feature = "rbd")]
    if let Some(spec) = &spec
        && args.backend.vhost_user.check
    {
        return match check_rbd(&args, spec) {
            Ok(what) => {
                eprintln!("bulkhead-blk: {what}");
                ExitCode::from(scaffold::EXIT_OK)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(scaffold::EXIT_FAILURE)
            }
        };
    }
    let _ = spec;
    scaffold::run(&PROGRAM, &args.backend, || build(&args))
}
