//! The command line of `bulkhead`: its clap definition, which `main`
//! parses and `bulkhead-docgen` turns into the man page and completions.

use std::path::PathBuf;

use bulkhead_common::sandbox::SandboxMode;
use clap::{CommandFactory, Parser, Subcommand};

/// Starts Bulkhead's backend daemons (bulkhead-blk, bulkhead-net,
/// bulkhead-console) and a frontend (bulkhead-vmm, or QEMU) from one TOML
/// file, prefixes their log lines with the device id, restarts a crashed
/// backend with bounded exponential backoff, and on SIGTERM or Ctrl-C stops
/// everything and removes its sockets. See docs/launcher.md.
#[derive(Parser, Debug)]
#[command(name = "bulkhead", version)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The launcher's subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Start the VM described by the config and supervise it until SIGTERM,
    /// Ctrl-C or the guest's exit. Exit status: the frontend's, 0 after a
    /// signal, 1 on an error.
    Up {
        /// The VM's TOML file.
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
        /// Confinement of the launcher and everything it starts, the
        /// daemons' words: no_new_privs, a seccomp filter refusing what no
        /// Bulkhead process needs (ptrace, mount, module loading, ...), and
        /// Landlock (only the programs it starts may be executed; no TCP).
        /// `log` logs refused calls instead; `off` for a QEMU whose extra
        /// args need TCP. Each child still takes its own --sandbox.
        #[arg(long, value_enum, value_name = "MODE", default_value = "enforce")]
        sandbox: SandboxMode,
    },
    /// Check the config, its files and each backend's options (the daemon's
    /// own parser, `--check`); print every problem, or the backends and
    /// frontend it describes. Exit status 1 if anything is wrong.
    Check {
        /// The VM's TOML file.
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
}

/// The clap definition of the command line, for `bulkhead-docgen` (the man
/// page and shell completions) and tests.
pub fn command() -> clap::Command {
    Args::command()
}
