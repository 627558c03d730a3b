//! `bulkhead-blk`: a vhost-user block device backend serving a raw image file
//! or block device.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_common::cli::{BusyPollArgs, error_chain};
use bulkhead_common::scaffold::{self, Backend, BackendArgs, Program, StartError};
use clap::{Parser, ValueEnum};

use bulkhead_blk::device::{BlkConfig, BlkDevice};
use bulkhead_blk::disk::{Disk, ImageOptions};
use bulkhead_blk::engine::{self, EngineKind};
use bulkhead_blk::image::FormatCheck;
use bulkhead_blk::{policy, request};

/// I/O engine choices on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    /// io_uring (falls back to sync with a warning where unavailable).
    IoUring,
    /// Blocking preadv/pwritev in the queue thread.
    Sync,
}

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

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > request::ID_BYTES {
        return Err(format!("at most {} bytes", request::ID_BYTES));
    }
    Ok(s.to_string())
}

/// vhost-user block device backend: serves a raw image file or block device to a
/// virtio-blk driver through any vhost-user frontend (QEMU, Cloud Hypervisor,
/// crosvm, bulkhead-vmm).
#[derive(Parser, Debug)]
#[command(name = "bulkhead-blk", version, after_help = scaffold::EXIT_STATUS_HELP)]
struct Args {
    #[command(flatten)]
    backend: BackendArgs,

    #[command(flatten)]
    busy_poll: BusyPollArgs,

    /// Raw image file or block device to serve.
    #[arg(long, visible_alias = "blk-file", value_name = "FILE",
          required_unless_present_any = ["print_capabilities", "image_fd"])]
    image: Option<PathBuf>,

    /// Use this inherited, already-open fd as the image instead of --image.
    #[arg(long, value_name = "N", conflicts_with = "image")]
    image_fd: Option<i32>,

    /// Serve the image read-only: writes, discards and write-zeroes fail with IOERR.
    #[arg(long, visible_alias = "read-only")]
    readonly: bool,

    /// Number of virtqueues (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,

    /// Largest virtqueue size the frontend may set (a power of two up to
    /// 32768); every smaller power of two works too. seg_max is 126 whatever
    /// this is (smaller only below 128).
    #[arg(long, value_name = "N", default_value = "1024", value_parser = parse_queue_size)]
    queue_size: u16,

    /// Device id returned to GET_ID requests (at most 20 bytes).
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    serial: Option<String>,

    /// I/O engine.
    #[arg(long, value_enum, default_value = "io-uring")]
    engine: EngineArg,

    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,

    /// raw: serve the image even if it starts like qcow2, vmdk, vhdx, vdi,
    /// qed, parallels or LUKS (refused by default: docs/blk.md).
    #[arg(long, value_enum, value_name = "FORMAT")]
    format: Option<FormatArg>,

    /// Do not take QEMU's image lock (another process may then write it too).
    #[arg(long)]
    no_lock: bool,
}

/// `--format`: only raw can be served; naming it skips the format probe.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    /// The bytes are the disk.
    Raw,
}

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
        "serving {} ({} bytes, {} queue(s) of up to {}, {:?} engine{}{})",
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
    let device = Arc::new(BlkDevice::new(
        disk,
        BlkConfig {
            readonly: args.readonly,
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            serial: args.serial.clone(),
            engine,
        },
    ));
    let mut backend = Backend::new(device, policy::policy(args.num_queues));
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
