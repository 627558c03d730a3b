//! The command line of `bulkhead-net`: its clap definition, which `main`
//! parses and `bulkhead-docgen` turns into the man page and completions.

use std::os::fd::RawFd;

use bulkhead_common::cli::BusyPollArgs;
use bulkhead_common::scaffold::{self, BackendArgs};
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
}

/// The clap definition of the command line, for `bulkhead-docgen` (the man
/// page and shell completions) and tests.
pub fn command() -> clap::Command {
    Args::command()
}
