//! `bulkhead-blk` as a library: the virtio-blk device, request parsing, the
//! image, the I/O engines and the sandbox policy. The binary (`main.rs`) only runs the command line of `cli.rs`; fuzz
//! targets and benchmarks use these modules directly.
#![warn(missing_docs)]

pub mod cli;
pub mod device;
pub mod disk;
pub mod engine;
pub mod image;
pub mod policy;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod request;
pub mod state;
