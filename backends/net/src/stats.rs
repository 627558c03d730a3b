//! The device's counters, shared by every queue and logged on disconnect, on
//! exit and on SIGUSR1.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// All counters as `name=value` pairs on one line.
    pub fn line(&self) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let fields = [
            ("rx_frames", c(&self.rx_frames)),
            ("rx_bytes", c(&self.rx_bytes)),
            ("rx_filtered", c(&self.rx_filtered)),
            ("rx_too_big", c(&self.rx_too_big)),
            ("rx_bad_buffers", c(&self.rx_bad_buffers)),
            ("rx_stalls", c(&self.rx_stalls)),
            ("rx_errors", c(&self.rx_errors)),
            ("tx_frames", c(&self.tx_frames)),
            ("tx_bytes", c(&self.tx_bytes)),
            ("tx_too_short", c(&self.tx_too_short)),
            ("tx_too_big", c(&self.tx_too_big)),
            ("tx_bad_header", c(&self.tx_bad_header)),
            ("tx_bad_gso", c(&self.tx_bad_gso)),
            ("tx_eagain", c(&self.tx_eagain)),
            ("tx_errors", c(&self.tx_errors)),
            ("ctrl_ok", c(&self.ctrl_ok)),
            ("ctrl_malformed", c(&self.ctrl_malformed)),
            ("ctrl_unsupported", c(&self.ctrl_unsupported)),
        ];
        fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
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
}
