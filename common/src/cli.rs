//! Command-line pieces shared by every daemon: the vhost-user backend program
//! conventions (`--socket-path`, `--fd`, `--print-capabilities`), error
//! chains, and the daemons' call into [`crate::logging`].

use std::io::Write;
use std::os::unix::io::RawFd;
use std::path::PathBuf;

/// Options every Bulkhead backend takes (vhost-user "backend program conventions").
#[derive(clap::Args, Debug, Clone)]
pub struct VhostUserArgs {
    /// Listen for the vhost-user frontend on this unix socket (created; a stale socket is replaced).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Use this inherited socket fd instead: a listening socket, or one end of a connected socketpair.
    /// Without either option, a socket-activated fd 3 (LISTEN_PID, LISTEN_FDS=1, as systemd
    /// passes a .socket unit's listener). With NOTIFY_SOCKET set, the daemon sends READY=1 once
    /// it serves and STOPPING=1 when it stops.
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,

    /// Print the backend's capabilities as JSON and exit; every other option is ignored.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Only check the other options: exit 0 if they are valid, 2 with the
    /// error if not. Opens nothing (the launcher's `bulkhead check` uses it).
    #[arg(long)]
    pub check: bool,
}

/// `--poll-max-us`, for the daemons whose queues busy-poll (blk, net).
#[derive(clap::Args, Debug, Clone)]
pub struct BusyPollArgs {
    /// A queue thread busy-polls its ring up to this many microseconds before
    /// it sleeps, adapting to how soon work follows (like QEMU's poll-max-ns;
    /// an idle queue does not spin). 0 turns polling off.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_MAX_US,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub poll_max_us: u32,
}

impl BusyPollArgs {
    /// The longest busy-poll.
    pub fn max(&self) -> std::time::Duration {
        std::time::Duration::from_micros(u64::from(self.poll_max_us))
    }
}

/// `--throttle-group` / `--throttle-group-fd`, for the daemons with I/O
/// limits (blk, net): limits shared with other daemons on this host.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ThrottleGroupArgs {
    /// Share I/O limits with every daemon that names the same file (created
    /// if missing; best on a tmpfs such as /run): the first sets the
    /// group's limits, a later one names the same limits or none. Members
    /// must trust each other (docs/security.md, "Resource limits").
    #[arg(long, value_name = "PATH", conflicts_with = "throttle_group_fd")]
    pub throttle_group: Option<PathBuf>,

    /// As --throttle-group, with an inherited open file (the launcher's
    /// sealed memfd).
    #[arg(long, value_name = "N")]
    pub throttle_group_fd: Option<RawFd>,
}

impl ThrottleGroupArgs {
    /// The daemon's throttle: its own `limits`, or the group's when it
    /// names one (opened here, before the sandbox).
    pub fn throttle(
        &self,
        kind: crate::throttle_group::GroupKind,
        limits: crate::throttle::Limits,
    ) -> Result<crate::throttle::Throttle, String> {
        use crate::throttle::Throttle;
        use crate::throttle_group::Group;
        let group = match (&self.throttle_group, self.throttle_group_fd) {
            (Some(path), _) => Group::open(path, kind, limits),
            (None, Some(fd)) => {
                // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
                if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(format!(
                        "--throttle-group-fd {fd}: not an open file descriptor"
                    ));
                }
                // SAFETY: the fd is open (checked) and was handed to this
                // process to own.
                let owned =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                Group::from_fd(owned, kind, limits)
            }
            (None, None) => return Throttle::new(limits).map_err(|e| e.to_string()),
        }
        .map_err(|e| e.to_string())?;
        log::info!(
            "I/O limits shared through throttle group {}",
            group.path().display()
        );
        Ok(Throttle::grouped(group))
    }
}

/// Default of `--poll-max-us`. QEMU's I/O threads default to 32 µs, tuned
/// for bare metal; in a VM a sleeping thread takes 25-40 µs to wake, so a
/// 32 µs poll just misses the next request of a QD 1 client, and 64 µs
/// catches it (docs/performance.md).
pub const DEFAULT_POLL_MAX_US: u32 = 64;

impl VhostUserArgs {
    /// Fails unless one of `--socket-path` or `--fd` was given.
    pub fn require_socket(&self) -> Result<(), String> {
        if self.socket_path.is_none() && self.fd.is_none() {
            return Err(
                "one of --socket-path or --fd is required (or a socket-activated fd 3: LISTEN_FDS)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Capabilities JSON (vhost-user spec, backend program conventions). The
/// schema (QEMU's docs/interop/vhost-user.json) defines features for some
/// types only (block: `read-only`, `blk-file`); a type without any gets no
/// `features` member, which the schema would not accept.
pub fn capabilities_json(device_type: &str, features: &[&str]) -> String {
    if features.is_empty() {
        return serde_json::json!({ "type": device_type }).to_string();
    }
    serde_json::json!({ "type": device_type, "features": features }).to_string()
}

/// Prints the capabilities if `--print-capabilities` is on the command line,
/// whatever else is there (the conventions say other options are ignored:
/// a management tool probes the binary without them); the exit code then.
/// Runs before the options are parsed, so a bad or missing one cannot fail it.
pub fn print_capabilities_if_asked(
    device_type: &str,
    features: &[&str],
) -> Option<std::process::ExitCode> {
    let asked = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--print-capabilities");
    if !asked {
        return None;
    }
    print_capabilities(device_type, features);
    Some(std::process::ExitCode::SUCCESS)
}

/// A ring size a device can run, as its `--queue-size` reads it: a power of
/// two up to the virtio maximum ([`crate::virtqueue::MAX_QUEUE_SIZE`]).
pub fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{e}"))?;
    if n == 0 || !n.is_power_of_two() || n > crate::virtqueue::MAX_QUEUE_SIZE {
        return Err(format!(
            "must be a power of two from 1 to {}",
            crate::virtqueue::MAX_QUEUE_SIZE
        ));
    }
    Ok(n)
}

/// Prints the capabilities JSON on stdout.
pub fn print_capabilities(device_type: &str, features: &[&str]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", capabilities_json(device_type, features));
}

/// `e` and its causes on one line, `outer: inner: innermost`: how every
/// Bulkhead binary prints an error.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Logs `e` with its causes; the exit code for a daemon's failed start or
/// run ([`crate::scaffold::EXIT_FAILURE`]).
pub fn fail(e: &dyn std::error::Error) -> std::process::ExitCode {
    log::error!("{}", error_chain(e));
    std::process::ExitCode::from(crate::scaffold::EXIT_FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_size_is_a_power_of_two_the_spec_allows() {
        assert_eq!(parse_queue_size("256"), Ok(256));
        assert_eq!(parse_queue_size("32768"), Ok(32768));
        for bad in ["0", "100", "65536", "-1", "lots"] {
            assert!(parse_queue_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_error_chain_names_every_cause_outermost_first() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot start")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("no such file"));
        assert_eq!(error_chain(&e), "cannot start: no such file");
    }

    #[test]
    fn capabilities_are_valid_json() {
        let v: serde_json::Value =
            serde_json::from_str(&capabilities_json("block", &["read-only"])).unwrap();
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"][0], "read-only");
        let v: serde_json::Value = serde_json::from_str(&capabilities_json("net", &[])).unwrap();
        assert_eq!(v, serde_json::json!({ "type": "net" }));
    }
}
