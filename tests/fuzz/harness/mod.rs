//! Fuzz harnesses for Bulkhead, shared by the libFuzzer targets
//! (`tests/fuzz/fuzz_targets/*.rs`) and the stable-toolchain corpus replay test
//! (`tests/tests/corpus_replay.rs`, which includes this module with `#[path]`).
//!
//! Every harness takes arbitrary bytes, decodes them with [`input::Input`]
//! (which never fails: missing bytes read as zero), drives the code under test
//! and asserts its invariants; a panic is a finding. Each harness also has a
//! seed encoder (`seeds()`) producing valid traffic in the same format.
//!
//! Adding a target for another backend (net, console, vmm): write
//! `harness/<name>.rs` with `run(&[u8])` and `seeds()`, list it in [`TARGETS`],
//! and add a three-line `fuzz_targets/<name>.rs` plus a `[[bin]]` entry.
#![allow(dead_code)]

pub mod blk_request;
pub mod chain;
pub mod console;
pub mod device;
pub mod device_state;
pub mod frontend;
pub mod guest;
pub mod inflight;
pub mod input;
pub mod net;
pub mod packed_ring;
pub mod vhost_user;
pub mod virtqueue;
pub mod vmm;

/// A fuzz target: its name (the `fuzz_targets/<name>.rs` binary and the
/// `corpus/<name>` directory), its harness and its seed generator.
pub struct Target {
    /// Binary and corpus directory name.
    pub name: &'static str,
    /// Runs one input; panics on a finding.
    pub run: fn(&[u8]),
    /// Named seed inputs built from valid traffic.
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
}

/// Every target, in the order docs/fuzzing.md lists them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "chain",
        run: chain::run,
        seeds: chain::seeds,
    },
    Target {
        name: "virtqueue",
        run: virtqueue::run,
        seeds: virtqueue::seeds,
    },
    Target {
        name: "packed_ring",
        run: packed_ring::run,
        seeds: packed_ring::seeds,
    },
    Target {
        name: "inflight",
        run: inflight::run,
        seeds: inflight::seeds,
    },
    Target {
        name: "blk_request",
        run: blk_request::run,
        seeds: blk_request::seeds,
    },
    Target {
        name: "vhost_user_messages",
        run: vhost_user::run,
        seeds: vhost_user::seeds,
    },
    Target {
        name: "net",
        run: net::run,
        seeds: net::seeds,
    },
    Target {
        name: "net_messages",
        run: vhost_user::run_net,
        seeds: vhost_user::seeds_net,
    },
    Target {
        name: "console",
        run: console::run,
        seeds: console::seeds,
    },
    Target {
        name: "console_messages",
        run: vhost_user::run_console,
        seeds: vhost_user::seeds_console,
    },
    Target {
        name: "device_state",
        run: device_state::run,
        seeds: device_state::seeds,
    },
    Target {
        name: "hostile_frontend",
        run: frontend::run,
        seeds: frontend::seeds,
    },
    Target {
        name: "vmm_pci",
        run: vmm::run_pci,
        seeds: vmm::seeds_pci,
    },
    Target {
        name: "vmm_mmio",
        run: vmm::run_mmio,
        seeds: vmm::seeds_mmio,
    },
];
