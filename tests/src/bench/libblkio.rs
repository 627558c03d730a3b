//! libblkio as a benchmark client: the same `blkio` client (its
//! `virtio-blk-vhost-user` driver at its defaults: 256-entry rings, no
//! indirect descriptors) drives `bulkhead-blk` and qemu-storage-daemon, so
//! the two backends are compared through a frontend neither was written
//! with. One thread per queue, `qd` requests kept in flight, each
//! completion resubmitted at once (as fio's libblkio engine does).

use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_tests::libblkio::{LibblkioClient, LibblkioQueue};

use super::client::{MAX_BLOCK, Result};
use super::workload::{Offsets, Sample, Spec};

/// A run fails when no completion arrives for this long.
const STALL: Duration = Duration::from_secs(10);

/// A libblkio client of a vhost-user-blk backend.
pub struct LibblkioBench {
    client: LibblkioClient,
}

impl LibblkioBench {
    /// Connects to `socket` with `queues` queues (libblkio's default of one
    /// is left alone for one) and `max_qd` buffers per queue.
    pub fn connect(socket: &Path, queues: usize, max_qd: usize) -> Result<Self> {
        let n = (queues > 1).then_some(queues);
        // The daemon creates its socket before it listens: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = loop {
            match LibblkioClient::connect_queues(socket, n, max_qd, MAX_BLOCK as usize) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(LibblkioBench { client })
    }

    /// Runs `spec` on every queue at once, one thread each.
    pub fn run(&mut self, spec: &Spec) -> Result<Sample> {
        let queues = self.client.queues_mut();
        let n = queues.len();
        let parts = std::thread::scope(|s| {
            let handles: Vec<_> = queues
                .iter_mut()
                .enumerate()
                .map(|(i, q)| s.spawn(move || run_queue(q, spec, i, n)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("queue thread panicked".into()))
                })
                .collect::<Result<Vec<Sample>>>()
        })?;
        Ok(Sample::merge(parts))
    }
}

fn run_queue(q: &mut LibblkioQueue, spec: &Spec, qi: usize, queues: usize) -> Result<Sample> {
    let bs = spec.pattern.block_size() as usize;
    let write = spec.pattern.is_write();
    let qd = spec.qd.min(q.slots()).max(1);
    let mut offsets = Offsets::new(spec, qi, queues);
    let mut issued = vec![Instant::now(); qd];
    let mut sample = Sample {
        lat_ns: Vec::with_capacity(1 << 16),
        ..Sample::default()
    };
    let submit = |q: &mut LibblkioQueue, slot: usize, off: u64| {
        if write {
            q.submit_write(slot, off, bs)
        } else {
            q.submit_read(slot, off, bs)
        }
    };
    let deadline = Instant::now() + spec.duration;
    for (slot, t) in issued.iter_mut().enumerate() {
        *t = Instant::now();
        submit(q, slot, offsets.next_offset())?;
    }
    let mut outstanding = qd;
    while outstanding > 0 {
        let done = q.complete_within(1, Some(STALL))?;
        if done.is_empty() {
            return Err(format!("queue {qi}: no completion for {STALL:?}").into());
        }
        let now = Instant::now();
        for (slot, ret) in done {
            let Some(t) = issued.get_mut(slot) else {
                return Err(format!("completion for unknown slot {slot}").into());
            };
            if ret < 0 {
                sample.errors += 1;
            }
            if now <= deadline {
                sample.ops += 1;
                let ns = now.duration_since(*t).as_nanos();
                sample.lat_ns.push(u32::try_from(ns).unwrap_or(u32::MAX));
                *t = Instant::now();
                submit(q, slot, offsets.next_offset())?;
            } else {
                outstanding -= 1;
            }
        }
    }
    sample.secs = spec.duration.as_secs_f64();
    sample.bytes = sample.ops * bs as u64;
    Ok(sample)
}
