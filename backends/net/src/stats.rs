//! The device's counters, shared by every queue and logged on disconnect, on
//! exit and on SIGUSR1.

use std::sync::atomic::{AtomicU64, Ordering};

use bulkhead_common::stats::Stats;

use crate::request::TxError;

/// Counters shared by every queue, logged on disconnect, on exit and on SIGUSR1.
#[derive(Default, Debug)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frame bytes delivered to the guest (without vnet headers).
    pub rx_bytes: AtomicU64,
    /// Frames dropped by the guest's receive filter (CTRL_RX).
    pub rx_filtered: AtomicU64,
    /// Frames larger than a receive buffer without MRG_RXBUF, dropped.
    pub rx_too_big: AtomicU64,
    /// Receive chains too small for a header, returned unused (guest errors).
    pub rx_bad_buffers: AtomicU64,
    /// Times the tap stopped being read because the guest had no buffers.
    pub rx_stalls: AtomicU64,
    /// Tap read errors and runt packets.
    pub rx_errors: AtomicU64,
    /// Frames written to the tap.
    pub tx_frames: AtomicU64,
    /// Frame bytes written to the tap (without vnet headers).
    pub tx_bytes: AtomicU64,
    /// Chains too short for the header and an Ethernet header, dropped.
    pub tx_too_short: AtomicU64,
    /// Frames over 64 KiB, dropped.
    pub tx_too_big: AtomicU64,
    /// Headers with bad flags or checksum fields, dropped.
    pub tx_bad_header: AtomicU64,
    /// Headers with a bad GSO type or GSO fields, dropped.
    pub tx_bad_gso: AtomicU64,
    /// Times the tap was full (EAGAIN); the frame was kept and retried.
    pub tx_eagain: AtomicU64,
    /// Tap write errors (frame dropped).
    pub tx_errors: AtomicU64,
    /// Control commands applied.
    pub ctrl_ok: AtomicU64,
    /// Control commands with bad lengths or values.
    pub ctrl_malformed: AtomicU64,
    /// Control commands of unknown or unnegotiated class/command.
    pub ctrl_unsupported: AtomicU64,
}

impl NetStats {
    /// Every counter, for the log line and the stats socket.
    pub fn snapshot(&self) -> Stats {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = Stats::new();
        s.counter(
            "rx_frames",
            "Frames delivered to the guest.",
            c(&self.rx_frames),
        )
        .counter(
            "rx_bytes",
            "Frame bytes delivered to the guest (without vnet headers).",
            c(&self.rx_bytes),
        )
        .counter(
            "rx_filtered",
            "Frames dropped by the guest's receive filter.",
            c(&self.rx_filtered),
        )
        .counter(
            "rx_too_big",
            "Frames larger than a receive buffer without MRG_RXBUF, dropped.",
            c(&self.rx_too_big),
        )
        .counter(
            "rx_bad_buffers",
            "Receive chains too small for a header (guest errors).",
            c(&self.rx_bad_buffers),
        )
        .counter(
            "rx_stalls",
            "Times the tap stopped being read because the guest had no buffers.",
            c(&self.rx_stalls),
        )
        .counter(
            "rx_errors",
            "Tap read errors and runt packets.",
            c(&self.rx_errors),
        )
        .counter(
            "tx_frames",
            "Frames written to the tap.",
            c(&self.tx_frames),
        )
        .counter(
            "tx_bytes",
            "Frame bytes written to the tap (without vnet headers).",
            c(&self.tx_bytes),
        )
        .counter(
            "tx_too_short",
            "Chains too short for the header and an Ethernet header, dropped.",
            c(&self.tx_too_short),
        )
        .counter(
            "tx_too_big",
            "Frames over 64 KiB, dropped.",
            c(&self.tx_too_big),
        )
        .counter(
            "tx_bad_header",
            "Headers with bad flags or checksum fields, dropped.",
            c(&self.tx_bad_header),
        )
        .counter(
            "tx_bad_gso",
            "Headers with a bad GSO type or GSO fields, dropped.",
            c(&self.tx_bad_gso),
        )
        .counter(
            "tx_eagain",
            "Times the tap was full; the frame was kept and retried.",
            c(&self.tx_eagain),
        )
        .counter(
            "tx_errors",
            "Tap write errors (frame dropped).",
            c(&self.tx_errors),
        )
        .counter("ctrl_ok", "Control commands applied.", c(&self.ctrl_ok))
        .counter(
            "ctrl_malformed",
            "Control commands with bad lengths or values.",
            c(&self.ctrl_malformed),
        )
        .counter(
            "ctrl_unsupported",
            "Control commands of unknown or unnegotiated class or command.",
            c(&self.ctrl_unsupported),
        );
        s
    }

    /// All counters as `name=value` pairs on one line.
    pub fn line(&self) -> String {
        self.snapshot().line()
    }

    pub(crate) fn count_tx_error(&self, e: &TxError) {
        let c = match e {
            TxError::TooShort(_) => &self.tx_too_short,
            TxError::TooBig(_) => &self.tx_too_big,
            TxError::BadFlags(_) | TxError::BadCsum { .. } => &self.tx_bad_header,
            TxError::BadGsoType(_) | TxError::BadGso { .. } => &self.tx_bad_gso,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_line_names_every_counter() {
        let s = NetStats::default();
        s.tx_bad_gso.fetch_add(3, Ordering::Relaxed);
        let line = s.line();
        assert!(line.contains("tx_bad_gso=3"));
        assert_eq!(line.split(' ').count(), 18);
    }

    #[test]
    fn every_counter_has_a_valid_name_and_a_help_line() {
        let s = NetStats::default().snapshot();
        assert_eq!(s.metrics().len(), 18);
        for m in s.metrics() {
            assert!(bulkhead_common::stats::valid_name(m.name), "{}", m.name);
            assert!(
                m.help.ends_with('.') && !m.help.contains('\n'),
                "{}",
                m.name
            );
        }
    }
}
