//! The text control protocol on a socket port's `.ctl` socket: `resize`,
//! `size` and `stats` lines, one reply line each.

use super::*;

/// Resize-control clients served at once per port.
const MAX_CTL_CLIENTS: usize = 4;
/// Longest resize-control command line.
const MAX_CTL_LINE: usize = 256;

impl Port {
    pub(super) fn accept_ctl(&self, h: &mut Host) {
        let Kind::Socket {
            ctl, ctl_clients, ..
        } = &mut h.kind
        else {
            return;
        };
        let Ok((stream, _)) = ctl.accept() else {
            return;
        };
        if ctl_clients.len() >= MAX_CTL_CLIENTS || stream.set_nonblocking(true).is_err() {
            return;
        }
        let fd = stream.as_raw_fd();
        let Ok(token) = usize::try_from(fd).map(HostEvent::CtlClient) else {
            return;
        };
        if self.event_ep.add_raw(fd, Interest::READ, token).is_ok() {
            ctl_clients.push(CtlClient {
                stream,
                line: Vec::new(),
            });
        }
    }

    /// Reads resize-control commands; returns a new size if one was set.
    pub(super) fn ctl_readable(&self, h: &mut Host, fd: RawFd) -> Option<(u16, u16)> {
        let Kind::Socket { ctl_clients, .. } = &mut h.kind else {
            return None;
        };
        let i = ctl_clients
            .iter()
            .position(|c| c.stream.as_raw_fd() == fd)?;
        let mut buf = [0u8; 256];
        // SAFETY: reading into a local buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let mut resized = None;
        let mut close = n == 0;
        if n < 0 {
            let e = io::Error::last_os_error();
            close = e.kind() != io::ErrorKind::WouldBlock;
        } else if n > 0 {
            let c = &mut ctl_clients[i];
            c.line.extend_from_slice(&buf[..n as usize]);
            while let Some(pos) = c.line.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = c.line.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let (reply, size) = self.command(line.trim());
                if let Some((cols, rows)) = size
                    && self.set_size(cols, rows)
                {
                    resized = Some((cols, rows));
                }
                let _ = write_nb(fd, reply.as_bytes(), true);
            }
            if c.line.len() > MAX_CTL_LINE {
                let _ = write_nb(fd, b"error: line too long\n", true);
                close = true;
            }
        }
        if close {
            ep_del(&self.event_ep, fd);
            ctl_clients.swap_remove(i);
        }
        resized
    }

    /// Runs one control command; returns the reply line and a size to set.
    pub(super) fn command(&self, line: &str) -> (String, Option<(u16, u16)>) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["resize", cols, rows] => match (cols.parse::<u16>(), rows.parse::<u16>()) {
                (Ok(c), Ok(r)) if c > 0 && r > 0 => ("ok\n".into(), Some((c, r))),
                _ => ("error: resize COLS ROWS, each 1..=65535\n".into(), None),
            },
            ["size"] => match self.size() {
                Some((c, r)) => (format!("{c} {r}\n"), None),
                None => ("unknown\n".into(), None),
            },
            ["stats"] => (format!("{}\n", self.stats_json()), None),
            _ => (
                "error: commands are `resize COLS ROWS`, `size`, `stats`\n".into(),
                None,
            ),
        }
    }
}
