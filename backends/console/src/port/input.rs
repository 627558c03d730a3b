//! Host input to the guest, and socket clients attaching and going away.

use super::*;

/// Replaced clients whose input is still read; a fifth closes the oldest.
const MAX_REPLACED: usize = 4;

impl Port {
    pub(super) fn forget_client(&self, c: &Client) {
        ep_del(&self.input_ep, c.stream.as_raw_fd());
        ep_del(&self.out_ep, c.stream.as_raw_fd());
        // A transmit worker waiting for this client must re-evaluate.
        let _ = self.out_wake.write(1);
    }

    /// Reads host input straight into the guest buffer `iov` (one copy, by the kernel).
    pub fn read_input(&self, iov: &[libc::iovec]) -> Input {
        let Some(mut h) = self.lock() else {
            return Input::Idle;
        };
        let cnt = iov.len().min(1024) as libc::c_int;
        if let Kind::Socket { replaced, .. } = &mut h.kind {
            // Replaced clients first: they typed before the current one.
            while let Some(old) = replaced.first() {
                // SAFETY: as below.
                let n = unsafe { libc::readv(old.as_raw_fd(), iov.as_ptr(), cnt) };
                if n > 0 {
                    self.stats.to_guest.fetch_add(n as u64, Ordering::Relaxed);
                    return Input::Data(n as usize);
                }
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                // End of its input (or an error): done with it.
                let old = replaced.remove(0);
                ep_del(&self.input_ep, old.as_raw_fd());
            }
        }
        let fd = match &h.kind {
            Kind::Socket {
                client: Some(c), ..
            } => c.stream.as_raw_fd(),
            Kind::Pty { master, .. } => master.as_raw_fd(),
            Kind::Stdio { input: true, .. } => 0,
            _ => return Input::Idle,
        };
        // SAFETY: the iovecs point into guest memory kept mapped by the caller's
        // chain snapshot; readv writes at most their lengths.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), cnt) };
        if n > 0 {
            self.stats.to_guest.fetch_add(n as u64, Ordering::Relaxed);
            return Input::Data(n as usize);
        }
        let err = (n < 0).then(io::Error::last_os_error);
        if let Some(e) = &err
            && matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            )
        {
            return Input::Idle;
        }
        // End of input, or an error: this source is done.
        match &mut h.kind {
            Kind::Socket { client, .. } => {
                if let Some(c) = client.take() {
                    bulkhead_common::rate_limited!(
                        log::Level::Info,
                        "port {}: client detached",
                        self.id
                    );
                    self.forget_client(&c);
                }
                h.out_armed = false;
            }
            Kind::Stdio { input, .. } => {
                *input = false;
                ep_del(&self.input_ep, 0);
            }
            Kind::Pty { .. } | Kind::File(_) => {}
        }
        Input::Idle
    }

    pub(super) fn accept(&self, h: &mut Host) {
        let Kind::Socket {
            listener,
            client,
            replaced,
            ..
        } = &mut h.kind
        else {
            return;
        };
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    bulkhead_common::rate_limited!(
                        log::Level::Warn,
                        "port {}: accept: {e}",
                        self.id
                    );
                }
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let fd = stream.as_raw_fd();
        if let Some(old) = client.take() {
            bulkhead_common::rate_limited!(
                log::Level::Info,
                "port {}: a new client replaces the attached one",
                self.id
            );
            // Its output side ends (it sees end of file); what it typed is
            // still read, ahead of the new client's input.
            ep_del(&self.out_ep, old.stream.as_raw_fd());
            let _ = old.stream.shutdown(std::net::Shutdown::Write);
            let _ = self.out_wake.write(1);
            if replaced.len() >= MAX_REPLACED {
                let gone = replaced.remove(0);
                ep_del(&self.input_ep, gone.as_raw_fd());
                bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "port {}: more than {MAX_REPLACED} replaced clients still open; closing the oldest",
                    self.id
                );
            }
            replaced.push(old.stream);
        }
        let rdhup = Interest {
            read: true,
            write: false,
            hangup: true,
        };
        if self.input_ep.add_raw(fd, rdhup, InEvent::Host).is_err()
            || self
                .out_ep
                .add_raw(fd, Interest::NONE, OutEvent::Out)
                .is_err()
        {
            ep_del(&self.input_ep, fd);
            return;
        }
        *client = Some(Client { stream, hup: false });
        h.out_armed = false;
        self.stats.attaches.fetch_add(1, Ordering::Relaxed);
        bulkhead_common::rate_limited!(
            log::Level::Info,
            "port {}: client attached ({} bytes of scrollback)",
            self.id,
            h.pending.len()
        );
        // The scrollback goes first.
        h.stalled = false;
        self.flush(h);
        let _ = self.out_wake.write(1);
    }
}
