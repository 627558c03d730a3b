//! The command line of `bulkhead-vmm`: its clap definition, which `main`
//! parses and `bulkhead-docgen` turns into the man page and completions.

use std::path::PathBuf;

use bulkhead_common::sandbox::SandboxMode;
use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{self, DeviceConfig, DeviceKind, SerialMode};
use crate::vmm::DEFAULT_CMDLINE;

fn blk(s: &str) -> Result<DeviceConfig, String> {
    config::parse_device(DeviceKind::Blk, s)
}
fn net(s: &str) -> Result<DeviceConfig, String> {
    config::parse_device(DeviceKind::Net, s)
}
fn console(s: &str) -> Result<DeviceConfig, String> {
    config::parse_device(DeviceKind::Console, s)
}
fn generic(s: &str) -> Result<DeviceConfig, String> {
    config::parse_device(DeviceKind::Generic, s)
}
fn cpus(s: &str) -> Result<u8, String> {
    let n: u8 = s.parse().map_err(|_| format!("'{s}' is not 1 to 254"))?;
    if n == 0 || n > crate::boot::mptable::MAX_CPUS {
        return Err(format!("'{s}' is not 1 to 254"));
    }
    Ok(n)
}

/// Thin KVM VMM: virtio-pci and virtio-mmio transports in front of
/// vhost-user backends (bulkhead-blk, bulkhead-net, bulkhead-console or any
/// other). Exit status: 0 guest powered off, 1 VMM error, 3 guest reboot,
/// 4 vCPU failure, 5 stopped through the API socket.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-vmm", version, subcommand_negates_reqs = true)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Kernel: ELF vmlinux with a PVH note, or bzImage.
    #[arg(long, value_name = "PATH", required = true)]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM (K, M or G suffix).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = config::parse_memory)]
    pub memory: u64,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = cpus)]
    pub cpus: u8,

    /// vhost-user block device: socket=PATH[,transport=pci|mmio][,queues=N][,queue-size=N][,packed=on].
    #[arg(long, value_name = "OPTS", value_parser = blk)]
    pub blk: Vec<DeviceConfig>,

    /// vhost-user net device: socket=PATH[,transport=pci|mmio][,queues=N][,queue-size=N][,packed=on].
    #[arg(long, value_name = "OPTS", value_parser = net)]
    pub net: Vec<DeviceConfig>,

    /// vhost-user console device: socket=PATH[,transport=pci|mmio][,queues=N][,queue-size=N][,packed=on].
    #[arg(long, value_name = "OPTS", value_parser = console)]
    pub console: Vec<DeviceConfig>,

    /// Any vhost-user device: socket=PATH,virtio-id=N[,queues=N][,queue-size=N][,config-size=N][,packed=on][,transport=...].
    #[arg(long = "vhost-user", value_name = "OPTS", value_parser = generic)]
    pub vhost_user: Vec<DeviceConfig>,

    /// Serial console (COM1): stdio, file=PATH or none.
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = config::parse_serial)]
    pub serial: SerialMode,

    /// Control socket: one JSON request per line (ping, status, shutdown,
    /// list, metrics, swap); see `bulkhead-vmm ctl`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Confinement, the daemons' flag and words: per-thread seccomp filters
    /// with argument checks and Landlock (no path but the --api-socket's
    /// directory, no TCP). `log` logs seccomp violations instead of killing
    /// the VMM; Landlock stays on. `--seccomp` and `kill` are older names.
    #[arg(
        long = "sandbox",
        alias = "seccomp",
        value_name = "MODE",
        value_enum,
        default_value = "enforce"
    )]
    pub seccomp: SandboxMode,

    /// Hide CMPXCHG16B from the guest's CPUID (for nested hypervisors that
    /// cannot run it; costs the guest some SLUB performance).
    #[arg(long)]
    pub no_cx16: bool,
}

/// Talk to a running VMM's control socket.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Send one request to a running VMM's --api-socket and print the JSON reply.
    Ctl {
        /// The VMM's control socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// The request to send.
        #[command(subcommand)]
        request: CtlRequest,
    },
    /// Check whether KVM here can run a Linux guest (exit 0), or print why not (exit 2).
    Probe,
}

/// A control request.
#[derive(Subcommand, Debug)]
pub enum CtlRequest {
    /// Liveness check.
    Ping,
    /// Whether the VM runs.
    Status,
    /// Stop the VM (the VMM exits with status 5).
    Shutdown,
    /// Devices, their backend socket and state (connected, reconnecting).
    List,
    /// The devices' counters in the Prometheus text format (printed as text, not JSON).
    Metrics,
    /// Move a running device to another backend process without rebooting the guest.
    Swap {
        /// Device id, as `list` shows it (blk0, net0, console0, or the id= given).
        device: String,
        /// Socket of the new backend (already listening).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
}

/// The clap definition of the command line, for `bulkhead-docgen` (the man
/// page and shell completions) and tests.
pub fn command() -> clap::Command {
    Args::command()
}
