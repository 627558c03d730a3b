//! `bulkhead-console` as a library: the virtio-console device, control-message
//! parsing and the host side of each port. The binary (`main.rs`) is only the
//! CLI.
#![warn(missing_docs)]

pub mod device;
pub mod port;
pub mod request;
pub mod state;
