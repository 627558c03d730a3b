//! `bulkhead-net` as a library: the virtio-net device, parsing of packet
//! headers and control commands, the tap device and the sandbox policy. The binary (`main.rs`)
//! only runs the command line of `cli.rs`; fuzz targets and benchmarks use these modules directly.
#![warn(missing_docs)]

pub mod cli;
mod ctrl;
pub mod device;
pub mod policy;
pub mod request;
mod ring;
mod rx;
pub mod state;
mod stats;
pub mod tap;
mod tx;
