//! The command line of `bulkhead-net`: its clap definition, which `main`
//! parses and `bulkhead-docgen` turns into the man page and completions.

use std::os::fd::RawFd;

use bulkhead_common::cli::BusyPollArgs;
use bulkhead_common::scaffold::{self, BackendArgs};
use bulkhead_common::throttle::{Limit, Limits};
use clap::{CommandFactory, Parser};

use crate::request::MacAddr;

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    MacAddr::parse_unicast(s)
}

/// vhost-user net device backend: connects a virtio-net driver, through any
/// vhost-user frontend (QEMU, Cloud Hypervisor, crosvm, bulkhead-vmm, DPDK
/// virtio-user), to a tap device on the host.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-net", version, after_help = scaffold::EXIT_STATUS_HELP)]
pub struct Args {
    /// The options every backend takes (socket, sandbox, user, ...).
    #[command(flatten)]
    pub backend: BackendArgs,

    /// `--poll-max-us`.
    #[command(flatten)]
    pub busy_poll: BusyPollArgs,

    /// Tap interface to open by name, created if absent (needs CAP_NET_ADMIN to create).
    #[arg(long, value_name = "NAME", conflicts_with = "tap_fd",
          required_unless_present_any = ["print_capabilities", "tap_fd"])]
    pub tap: Option<String>,

    /// Inherited tap queue fd opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; repeat once per queue pair.
    #[arg(long, value_name = "N")]
    pub tap_fd: Vec<RawFd>,

    /// MAC address offered to the driver (VIRTIO_NET_F_MAC); the driver picks one otherwise.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub mac: Option<MacAddr>,

    /// MTU offered to the driver (VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(68..))]
    pub mtu: Option<u16>,

    /// Queue pairs (rx+tx, one tap queue each); default: the number of --tap-fd, or 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queue_pairs: Option<u16>,

    /// Largest virtqueue size the frontend may set (a power of two up to
    /// 32768); every smaller power of two works too.
    #[arg(long, value_name = "N", default_value = "1024", value_parser = bulkhead_common::cli::parse_queue_size)]
    pub queue_size: u16,

    /// Packet and byte limits (`--rx-pps`, `--tx-bps-max`, ...).
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

/// Packet and byte limits per direction, shared by all queue pairs.
/// 0 or absent: no limit.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Limits (shared by all queue pairs; 0: none)")]
pub struct LimitArgs {
    /// Frames per second from the tap to the guest (the rest wait in the tap).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub rx_pps: u64,
    /// Burst of --rx-pps: frames that may go at once after an idle spell
    /// (default: a tenth of a second's rate).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub rx_pps_max: u64,
    /// Bytes per second from the tap to the guest (K, M, G suffixes).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub rx_bps: u64,
    /// Burst of --rx-bps, in bytes.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub rx_bps_max: u64,
    /// Frames per second from the guest to the tap (the rest wait in the ring).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub tx_pps: u64,
    /// Burst of --tx-pps.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub tx_pps_max: u64,
    /// Bytes per second from the guest to the tap (K, M, G suffixes).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub tx_bps: u64,
    /// Burst of --tx-bps, in bytes.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "0",
          hide_default_value = true)]
    pub tx_bps_max: u64,
}

impl LimitArgs {
    /// The limits, checked: receive is the throttle's read direction,
    /// transmit its write direction.
    pub fn limits(&self) -> Result<Limits, String> {
        let l = |rate, burst| Limit { rate, burst };
        let limits = Limits {
            iops_read: l(self.rx_pps, self.rx_pps_max),
            iops_write: l(self.tx_pps, self.tx_pps_max),
            bps_read: l(self.rx_bps, self.rx_bps_max),
            bps_write: l(self.tx_bps, self.tx_bps_max),
            ..Limits::NONE
        };
        // The throttle names its limits as blk's; say them as ours.
        limits.validate().map_err(|e| {
            e.to_string()
                .replace("iops-read", "rx-pps")
                .replace("iops-write", "tx-pps")
                .replace("bps-read", "rx-bps")
                .replace("bps-write", "tx-bps")
        })?;
        Ok(limits)
    }
}

/// The clap definition of the command line, for `bulkhead-docgen` (the man
/// page and shell completions) and tests.
pub fn command() -> clap::Command {
    Args::command()
}
