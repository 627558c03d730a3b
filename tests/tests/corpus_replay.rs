//! Replays every committed fuzz input through the same harness the libFuzzer
//! targets run (`tests/fuzz/harness`, included here with `#[path]`), on the
//! stable toolchain, on every `cargo test`: the seeds (`fuzz/seeds/<target>`),
//! the minimized corpus (`fuzz/corpus/<target>`) and every input that once
//! crashed a target (`fuzz/regressions/<target>`). A fixed bug stays fixed.
//!
//! `BULKHEAD_WRITE_SEEDS=1 cargo test -p bulkhead-tests --test corpus_replay
//! seeds_match_their_generators` rewrites the seeds from their generators.

#[path = "../fuzz/harness/mod.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Panics in queue worker threads (the handler only logs a failed join).
static THREAD_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_thread_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("vring-"))
            {
                THREAD_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            prev(info);
        }));
    });
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn target(name: &str) -> &'static harness::Target {
    harness::TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// Every committed input of `name`: seeds, corpus, regressions.
fn inputs(name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["seeds", "corpus", "regressions"] {
        let Ok(rd) = std::fs::read_dir(fuzz_dir().join(dir).join(name)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

fn replay(name: &str) {
    count_thread_panics();
    let t = target(name);
    let files = inputs(name);
    assert!(!files.is_empty(), "no committed inputs for {name}");
    for f in &files {
        let data = std::fs::read(f).expect("read fuzz input");
        let before = THREAD_PANICS.load(Ordering::SeqCst);
        if std::panic::catch_unwind(|| (t.run)(&data)).is_err() {
            panic!("{name}: {} fails", f.display());
        }
        assert_eq!(
            THREAD_PANICS.load(Ordering::SeqCst),
            before,
            "{name}: {} panics a queue thread",
            f.display()
        );
    }
    eprintln!("{name}: {} inputs replayed", files.len());
}

#[test]
fn chain_inputs_replay_cleanly() {
    replay("chain");
}

#[test]
fn virtqueue_inputs_replay_cleanly() {
    replay("virtqueue");
}

#[test]
fn packed_ring_inputs_replay_cleanly() {
    replay("packed_ring");
}

#[test]
fn inflight_inputs_replay_cleanly() {
    replay("inflight");
}

#[test]
fn blk_request_inputs_replay_cleanly() {
    replay("blk_request");
}

#[test]
fn vhost_user_messages_inputs_replay_cleanly() {
    replay("vhost_user_messages");
}

#[test]
fn net_messages_inputs_replay_cleanly() {
    replay("net_messages");
}

#[test]
fn console_messages_inputs_replay_cleanly() {
    replay("console_messages");
}

#[test]
fn net_inputs_replay_cleanly() {
    replay("net");
}

#[test]
fn console_inputs_replay_cleanly() {
    replay("console");
}

#[test]
fn device_state_inputs_replay_cleanly() {
    replay("device_state");
}

#[test]
fn device_state_seeds_are_states_the_devices_accept() {
    for (name, bytes) in harness::device_state::seeds() {
        let refused = name.contains("too-many");
        assert_eq!(
            harness::device_state::accepts(&bytes),
            !refused,
            "seed {name}"
        );
    }
}

#[test]
fn hostile_frontend_inputs_replay_cleanly() {
    replay("hostile_frontend");
}

#[test]
fn vmm_pci_inputs_replay_cleanly() {
    replay("vmm_pci");
}

#[test]
fn vmm_mmio_inputs_replay_cleanly() {
    replay("vmm_mmio");
}

#[test]
fn every_target_is_replayed_and_has_a_fuzz_binary() {
    let src = include_str!("corpus_replay.rs");
    for t in harness::TARGETS {
        assert!(
            src.contains(&format!("replay(\"{}\")", t.name)),
            "{} is not replayed here",
            t.name
        );
        let bin = fuzz_dir()
            .join("fuzz_targets")
            .join(format!("{}.rs", t.name));
        assert!(bin.is_file(), "{} has no fuzz target", t.name);
    }
}

#[test]
fn seeds_match_their_generators() {
    let write = std::env::var_os("BULKHEAD_WRITE_SEEDS").is_some();
    for t in harness::TARGETS {
        let dir = fuzz_dir().join("seeds").join(t.name);
        if write {
            std::fs::create_dir_all(&dir).expect("create seed dir");
        }
        for (name, bytes) in (t.seeds)() {
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &bytes).expect("write seed");
            } else {
                let committed = std::fs::read(&path).unwrap_or_default();
                assert!(
                    committed == bytes,
                    "{} is stale: rerun with BULKHEAD_WRITE_SEEDS=1",
                    path.display()
                );
            }
        }
    }
}
