//! The command line of `bulkhead-blk`: its clap definition, which `main`
//! parses and `bulkhead-docgen` turns into the man page and completions.

use std::path::PathBuf;

use bulkhead_common::cli::BusyPollArgs;
use bulkhead_common::scaffold::{self, BackendArgs};
use bulkhead_common::throttle::{Limit, LimitError, Limits};
use clap::{CommandFactory, Parser, ValueEnum};

use crate::request;

/// I/O engine choices on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EngineArg {
    /// io_uring (falls back to sync with a warning where unavailable).
    IoUring,
    /// Blocking preadv/pwritev in the queue thread.
    Sync,
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
pub struct Args {
    /// The options every backend takes (socket, sandbox, user, ...).
    #[command(flatten)]
    pub backend: BackendArgs,

    /// `--poll-max-us`.
    #[command(flatten)]
    pub busy_poll: BusyPollArgs,

    /// Raw image file or block device to serve, or rbd:POOL/IMAGE for an
    /// image on Ceph RBD (needs --sandbox off; see docs/blk.md).
    #[arg(long, visible_alias = "blk-file", value_name = "FILE",
          required_unless_present_any = ["print_capabilities", "image_fd"])]
    pub image: Option<PathBuf>,

    /// Use this inherited, already-open fd as the image instead of --image.
    #[arg(long, value_name = "N", conflicts_with = "image")]
    pub image_fd: Option<i32>,

    /// Serve the image read-only: writes, discards and write-zeroes fail with IOERR.
    #[arg(long, visible_alias = "read-only")]
    pub readonly: bool,

    /// Number of virtqueues (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Largest virtqueue size the frontend may set (a power of two up to
    /// 32768); every smaller power of two works too. seg_max is 126 whatever
    /// this is (smaller only below 128).
    #[arg(long, value_name = "N", default_value = "1024", value_parser = bulkhead_common::cli::parse_queue_size)]
    pub queue_size: u16,

    /// Device id returned to GET_ID requests (at most 20 bytes).
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    pub serial: Option<String>,

    /// I/O engine.
    #[arg(long, value_enum, default_value = "io-uring")]
    pub engine: EngineArg,

    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,

    /// raw: serve the image even if it starts like qcow2, vmdk, vhdx, vdi,
    /// qed, parallels or LUKS (refused by default: docs/blk.md).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<FormatArg>,

    /// Do not take QEMU's image lock (another process may then write it too).
    #[arg(long)]
    pub no_lock: bool,

    /// RBD: the Ceph configuration file (default: $CEPH_CONF, then
    /// /etc/ceph/ceph.conf, ~/.ceph/ceph.conf, ./ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,

    /// RBD: the Ceph client name without "client." (default: admin); its
    /// keyring is found through the configuration file.
    #[arg(long, value_name = "NAME")]
    pub ceph_id: Option<String>,

    /// RBD: if another client holds the image's exclusive lock, break it at
    /// start and blocklist that client (fencing it off) instead of waiting
    /// for it to let go. Only for a holder that is dead or must be cut off.
    #[arg(long)]
    pub break_lock: bool,

    /// I/O limits (`--iops-total`, `--bps-read-max`, ...).
    #[command(flatten)]
    pub limits: LimitArgs,

    /// `--throttle-group`: limits shared with other daemons.
    #[command(flatten)]
    pub throttle_group: bulkhead_common::cli::ThrottleGroupArgs,
}

/// A byte rate: a count, or with a K, M or G suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    bulkhead_common::size::parse_memory(s)
}

/// The I/O limits, named like QEMU's throttle-group properties
/// (`iops-total`, `bps-read-max`, ...). 0 or absent: no limit.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "I/O limits (shared by all queues; 0: none)")]
pub struct LimitArgs {
    /// Requests per second, reads and writes together (flush, discard and
    /// write-zeroes count as writes).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub iops_total: u64,
    /// Burst of --iops-total: requests that may go at once after an idle
    /// spell (default: a tenth of a second's rate).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub iops_total_max: u64,
    /// Read requests per second.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub iops_read: u64,
    /// Burst of --iops-read.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub iops_read_max: u64,
    /// Write requests per second (writes, flushes, discards, write-zeroes).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub iops_write: u64,
    /// Burst of --iops-write.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub iops_write_max: u64,
    /// Bytes per second read and written together (K, M, G suffixes).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub bps_total: u64,
    /// Burst of --bps-total, in bytes (default: a tenth of a second's rate).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub bps_total_max: u64,
    /// Bytes per second read.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub bps_read: u64,
    /// Burst of --bps-read, in bytes.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub bps_read_max: u64,
    /// Bytes per second written (write-zeroes counts the bytes it zeroes).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub bps_write: u64,
    /// Burst of --bps-write, in bytes.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub bps_write_max: u64,
}

impl LimitArgs {
    /// The limits, checked (a burst without its rate, a burst below its
    /// rate, a total with a per-direction limit of the same kind are refused).
    pub fn limits(&self) -> Result<Limits, LimitError> {
        let l = |rate, burst| Limit { rate, burst };
        let limits = Limits {
            iops_total: l(self.iops_total, self.iops_total_max),
            iops_read: l(self.iops_read, self.iops_read_max),
            iops_write: l(self.iops_write, self.iops_write_max),
            bps_total: l(self.bps_total, self.bps_total_max),
            bps_read: l(self.bps_read, self.bps_read_max),
            bps_write: l(self.bps_write, self.bps_write_max),
        };
        limits.validate()?;
        Ok(limits)
    }
}

/// `--format`: only raw can be served; naming it skips the format probe.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// The bytes are the disk.
    Raw,
}

/// The clap definition of the command line, for `bulkhead-docgen` (the man
/// page and shell completions) and tests.
pub fn command() -> clap::Command {
    Args::command()
}
