//! `bulkhead up --config vm.toml`: run one VM's backends and frontend under supervision.

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_common::cli::error_chain;
use bulkhead_common::sandbox::SandboxMode;
use bulkhead_launcher::config::Config;
use bulkhead_launcher::supervisor::Supervisor;
use clap::{Parser, Subcommand};

/// Starts Bulkhead's backend daemons (bulkhead-blk, bulkhead-net,
/// bulkhead-console) and a frontend (bulkhead-vmm, or QEMU) from one TOML
/// file, prefixes their log lines with the device id, restarts a crashed
/// backend with bounded exponential backoff, and on SIGTERM or Ctrl-C stops
/// everything and removes its sockets. See docs/launcher.md.
#[derive(Parser, Debug)]
#[command(name = "bulkhead", version)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let (config, sandbox) = match &args.command {
        Cmd::Up { config, sandbox } => (config, *sandbox),
        Cmd::Check { config } => return check(config),
    };
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulkhead: {}: {e}", config.display());
            return ExitCode::from(1);
        }
    };
    let s = match Supervisor::new(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bulkhead: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    match bulkhead_launcher::sandbox::enter(sandbox, &s.programs()) {
        Ok(what) => log::info!("{what}"),
        Err(e) => {
            eprintln!("bulkhead: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    }
    ExitCode::from(s.run())
}

/// `bulkhead check`: every problem at once, each naming its field.
fn check(config: &std::path::Path) -> ExitCode {
    let cfg = match Config::read(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulkhead: {}: {e}", config.display());
            return ExitCode::from(1);
        }
    };
    let mut problems = cfg.problems();
    problems.extend(bulkhead_launcher::check::problems(&cfg));
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("bulkhead: {}: {p}", config.display());
        }
        return ExitCode::from(1);
    }
    for b in cfg.backends(std::path::Path::new("RUNTIME_DIR")) {
        println!("{} {} {}", b.id, b.kind.binary(), b.args.join(" "));
    }
    println!("frontend: {:?}", cfg.frontend);
    ExitCode::SUCCESS
}
