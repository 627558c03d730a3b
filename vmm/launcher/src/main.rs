//! `bulkhead up --config vm.toml`: run one VM's backends and frontend under supervision.

use std::process::ExitCode;

use bulkhead_common::cli::error_chain;
use bulkhead_common::logging;
use bulkhead_launcher::cli::{Args, Cmd};
use bulkhead_launcher::config::Config;
use bulkhead_launcher::supervisor::Supervisor;
use clap::Parser;

fn main() -> ExitCode {
    logging::init_logging("bulkhead", log::LevelFilter::Warn);
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
    match bulkhead_launcher::sandbox::enter(sandbox, &s.programs(), s.needs_network()) {
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
    println!("frontend: {}", cfg.frontend);
    ExitCode::SUCCESS
}
