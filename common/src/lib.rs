//! Pieces shared by every Bulkhead vhost-user backend: guest memory from the
//! frontend's table, validated descriptor-chain snapshots, split virtqueues
//! with in-flight head tracking, vhost-user inflight I/O tracking, the
//! request handler, per-queue worker threads, and the daemon serve loop.
#![warn(missing_docs)]

pub mod chain;
pub mod cli;
pub mod daemon;
pub mod device;
pub mod frontend_fd;
pub mod handler;
pub mod inflight;
pub mod memory;
pub mod notify;
pub mod ratelimit;
pub mod sandbox;
pub mod size;
pub mod state;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod transfer;
pub mod virtqueue;
pub mod worker;

pub use chain::{ChainError, Descriptor, DescriptorChain, Reader, Writer};
pub use device::{Polled, QueueWorker, VhostUserDevice};
pub use virtqueue::VirtQueue;
pub use worker::WorkerCtl;
