//! A port's counters and the JSON its control socket's `stats` reports.

use std::sync::atomic::AtomicU64;

use super::*;

/// Counters of one port.
#[derive(Default, Debug)]
pub struct PortStats {
    /// Bytes the guest sent (tx queue and emergency writes).
    pub from_guest: AtomicU64,
    /// Bytes handed to the host side (socket client, pty, file, stdout).
    pub delivered: AtomicU64,
    /// Bytes dropped from the scrollback when it was full.
    pub dropped: AtomicU64,
    /// Bytes read from the host side into guest buffers.
    pub to_guest: AtomicU64,
    /// Socket clients attached so far.
    pub attaches: AtomicU64,
    /// Host-side write errors (a log file that failed, say).
    pub write_errors: AtomicU64,
}

/// Per-device counters and resize state the ports' control sockets report.
pub trait StatsSource: Send + Sync {
    /// A JSON object of device-wide counters.
    fn device_stats(&self) -> serde_json::Value;
}

impl Port {
    /// The port's counters (and the device's) as one JSON object.
    pub fn stats_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let device = self
            .device_stats
            .lock()
            .ok()
            .and_then(|g| g.as_ref().and_then(Weak::upgrade))
            .map(|d| d.device_stats())
            .unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "port": self.id,
            "name": self.name,
            "from_guest": l(&s.from_guest),
            "delivered": l(&s.delivered),
            "dropped": l(&s.dropped),
            "to_guest": l(&s.to_guest),
            "attaches": l(&s.attaches),
            "write_errors": l(&s.write_errors),
            "device": device,
        })
    }
}
