//! Bulkhead test kit: a vhost-user frontend plus a virtio guest driver written
//! independently of the daemons, used by integration tests, benchmarks and
//! adversarial tests. Also the QEMU guest harness for tests with a real Linux
//! driver.
#![warn(missing_docs)]

pub mod blk;
pub mod ceph;
pub mod console;
pub mod cpio;
pub mod daemon;
pub mod device_state;
pub mod frontend;
pub mod guest;
pub mod le;
pub mod libblkio;
pub mod memory;
pub mod nested;
pub mod net;
pub mod netns;
pub mod process;
pub mod sandbox;
pub mod skip;
pub mod stats;
pub mod vcpus;
pub mod virtq;
