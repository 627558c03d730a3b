//! `bulkhead-console` as a library: the virtio-console device, control-message
//! parsing, the host side of each port and the sandbox policy. The binary (`main.rs`) only runs the
//! command line of `cli.rs`.
#![warn(missing_docs)]

pub mod cli;
pub mod device;
pub mod policy;
pub mod port;
pub mod request;
pub mod state;
