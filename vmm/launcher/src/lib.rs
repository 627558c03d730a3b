//! `bulkhead`: starts one VM's Bulkhead backend daemons, each in its own
//! process, and a frontend (`bulkhead-vmm`, or QEMU where KVM cannot run a
//! guest) from one TOML file; restarts crashed backends with bounded
//! exponential backoff while the frontend reconnects; stops everything and
//! removes every socket on SIGTERM or Ctrl-C; confines itself and its
//! children first (`sandbox`). See `docs/launcher.md`.
#![warn(missing_docs)]

pub mod check;
pub mod cli;
pub mod config;
pub mod frontend;
pub mod sandbox;
pub mod supervisor;
