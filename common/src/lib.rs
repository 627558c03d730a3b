//! Pieces shared by every Bulkhead vhost-user backend: guest memory from the
//! frontend's table, validated descriptor-chain snapshots, split virtqueues
//! with in-flight head tracking, vhost-user inflight I/O tracking, the
//! request handler, per-queue worker threads, the daemon serve loop, the
//! sandbox, and the scaffold every daemon's `main` runs ([`scaffold::run`]).
#![warn(missing_docs)]

pub mod chain;
pub mod cli;
pub mod daemon;
pub mod device;
pub mod dirty_log;
pub mod event;
pub mod frontend_fd;
pub mod handler;
pub mod inflight;
pub mod logging;
pub mod memory;
pub mod notify;
pub mod ratelimit;
pub mod sandbox;
pub mod scaffold;
pub mod size;
pub mod state;
pub mod stats;
pub mod stats_socket;
pub mod systemd;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod throttle;
pub mod throttle_group;
pub mod transfer;
pub mod virtqueue;
pub mod worker;

/// The virtio spec layer (`bulkhead-spec`), for the backends.
pub use bulkhead_spec as spec;

pub use chain::{ChainError, Descriptor, DescriptorChain, Reader, Writer};
pub use device::VhostUserDevice;
pub use virtqueue::VirtQueue;
pub use worker::{Polled, QueueWorker, WorkerCtl};
