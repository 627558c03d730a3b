//! Guest output to the host side: the output state machine (write through
//! while the host side keeps up, hold in the scrollback while it is
//! congested, stop waiting after [`super::STALL_MS`]), output readiness and
//! hang-ups.

use super::*;

impl Port {
    /// Guest output: delivered now if the host side takes it, else kept in the
    /// scrollback. Returns true when the caller should wait for the host side
    /// to drain before sending more (see [`Port::handle_out_events`]).
    pub fn output(&self, data: &[u8]) -> bool {
        self.stats
            .from_guest
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let Some(mut h) = self.lock() else {
            return false;
        };
        if let Kind::File(f) = &mut h.kind {
            match f.write_all(data) {
                Ok(()) => {
                    self.stats
                        .delivered
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    bulkhead_common::rate_limited!(
                        log::Level::Warn,
                        "port {}: writing the log file: {e}",
                        self.id
                    );
                }
            }
            return false;
        }
        let mut rest = data;
        if h.pending.is_empty()
            && let Some((fd, socket)) = out_fd(&h.kind)
        {
            match write_nb(fd, data, socket) {
                Ok(n) => {
                    self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
                    rest = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => self.out_failed(&mut h, &e),
            }
        }
        if !rest.is_empty() {
            let dropped = h.pending.push(rest);
            self.stats
                .dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        self.update_out_interest(&mut h);
        congested(&h)
    }

    /// Handles output readiness (transmit worker); returns whether output is still congested.
    pub fn handle_out_events(&self) -> bool {
        let evs = self.out_ep.wait(Some(Duration::ZERO)).unwrap_or_default();
        let Some(mut h) = self.lock() else {
            return false;
        };
        for ev in &evs {
            match ev.token {
                OutEvent::Wake => {
                    let _ = self.out_wake.read();
                }
                OutEvent::Out => {
                    if ev.writable {
                        self.flush(&mut h);
                    }
                    if ev.hangup {
                        self.hung_up(&mut h);
                    }
                }
            }
        }
        congested(&h)
    }

    /// The host side made no progress in time: stop waiting for it (drop-oldest) until it drains.
    pub fn give_up_waiting(&self) {
        if let Some(mut h) = self.lock()
            && !h.stalled
            && congested(&h)
        {
            bulkhead_common::rate_limited!(
                log::Level::Info,
                "port {}: host side not reading; dropping the oldest output beyond the scrollback",
                self.id
            );
            h.stalled = true;
        }
    }

    /// Writes scrollback bytes while the host side takes them.
    pub(super) fn flush(&self, h: &mut Host) {
        while !h.pending.is_empty() {
            let Some((fd, socket)) = out_fd(&h.kind) else {
                break;
            };
            match write_nb(fd, h.pending.front(), socket) {
                Ok(0) => break,
                Ok(n) => {
                    h.pending.consume(n);
                    self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
                    if h.pending.is_empty() {
                        h.stalled = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.out_failed(h, &e);
                    break;
                }
            }
        }
        self.update_out_interest(h);
    }

    /// The output fd failed for good: a socket client is detached, stdout given up.
    pub(super) fn out_failed(&self, h: &mut Host, e: &io::Error) {
        match &mut h.kind {
            Kind::Socket { client, .. } => {
                if let Some(c) = client.take() {
                    bulkhead_common::rate_limited!(
                        log::Level::Info,
                        "port {}: client detached ({e})",
                        self.id
                    );
                    self.forget_client(&c);
                }
            }
            Kind::Stdio { out_broken, .. } => {
                if !*out_broken {
                    bulkhead_common::rate_limited!(
                        log::Level::Warn,
                        "port {}: stdout failed ({e}); output kept in the scrollback",
                        self.id
                    );
                }
                *out_broken = true;
                ep_del(&self.out_ep, 1);
            }
            Kind::Pty { .. } => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            Kind::File(_) => {}
        }
        h.out_armed = false;
    }

    /// Watches for room to write exactly while output is pending.
    pub(super) fn update_out_interest(&self, h: &mut Host) {
        let fd = match &h.kind {
            Kind::Socket {
                client: Some(c), ..
            } if !c.hup => Some(c.stream.as_raw_fd()),
            Kind::Pty { master, .. } => Some(master.as_raw_fd()),
            Kind::Stdio {
                out_pollable: true,
                out_broken: false,
                ..
            } => Some(1),
            _ => None,
        };
        let want = fd.is_some() && !h.pending.is_empty();
        if let Some(fd) = fd
            && want != h.out_armed
        {
            let ev = if want {
                Interest::WRITE
            } else {
                Interest::NONE
            };
            if self.out_ep.modify_raw(fd, ev, OutEvent::Out).is_ok() {
                h.out_armed = want;
            }
        } else if fd.is_none() {
            h.out_armed = false;
        }
    }

    pub(super) fn hung_up(&self, h: &mut Host) {
        match &mut h.kind {
            Kind::Socket {
                client: Some(c), ..
            } => {
                // Keep draining its input; stop watching it for output.
                c.hup = true;
                ep_del(&self.out_ep, c.stream.as_raw_fd());
                h.out_armed = false;
            }
            Kind::Stdio { out_broken, .. } => {
                *out_broken = true;
                ep_del(&self.out_ep, 1);
                h.out_armed = false;
            }
            _ => {}
        }
    }
}

/// Whether output is pending for a host side that is expected to drain it.
pub(super) fn congested(h: &Host) -> bool {
    !h.pending.is_empty() && !h.stalled && out_fd(&h.kind).is_some()
}

/// The fd guest output goes to now, and whether it is a socket.
pub(super) fn out_fd(kind: &Kind) -> Option<(RawFd, bool)> {
    match kind {
        Kind::Socket {
            client: Some(c), ..
        } if !c.hup => Some((c.stream.as_raw_fd(), true)),
        Kind::Pty { master, .. } => Some((master.as_raw_fd(), false)),
        Kind::Stdio {
            out_broken: false, ..
        } => Some((1, false)),
        _ => None,
    }
}
