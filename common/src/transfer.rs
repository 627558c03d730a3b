//! Moving a state blob through the fd of SET_DEVICE_STATE_FD.
//!
//! The frontend reads (SAVE) or writes (LOAD) its end only after the daemon
//! answered the message, and a pipe holds as little as one page, so the
//! daemon cannot move the bytes before it answers. Each transfer runs in a
//! thread of its own instead, on the non-blocking fd with `poll` and a
//! deadline ([`TRANSFER_DEADLINE`]): a frontend that never reads, never
//! writes or never closes its end gets an error from CHECK_DEVICE_STATE, and
//! the main thread waits at most that long for it. The thread runs under the
//! main thread's seccomp filter (it needs `poll`, `read`, `write`, `close`,
//! `fcntl` F_GETFL/F_SETFL, all allowed there).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::event::{EventLoop, Interest};
use crate::state::MAX_BLOB;

/// Longest a transfer may take, from SET_DEVICE_STATE_FD to the end of file.
pub const TRANSFER_DEADLINE: Duration = Duration::from_secs(5);

/// Why a transfer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The frontend did not finish its side in time.
    #[error("the frontend did not {0} within {1:?}")]
    Deadline(&'static str, Duration),
    /// More bytes than a state blob may have.
    #[error("the frontend sent more than {MAX_BLOB} bytes of state")]
    Oversized,
    /// The frontend closed its end before it took the whole blob.
    #[error("the frontend closed its end after {0} of {1} bytes")]
    Closed(usize, usize),
    /// Reading, writing or polling the fd failed.
    #[error("device state fd: {0}")]
    Io(String),
    /// The transfer thread ended abnormally.
    #[error("the transfer thread failed")]
    Thread,
}

/// A running transfer: its thread gives the bytes read (LOAD) or nothing (SAVE).
pub struct Transfer {
    load: bool,
    handle: JoinHandle<Result<Vec<u8>, TransferError>>,
}

fn set_nonblocking(fd: &File) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl with integer arguments on an fd we hold.
    let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The one fd a transfer waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pipe {
    /// The blob's pipe end.
    End,
}
crate::event_token!(Pipe { End });

/// Waits until `fd` is ready for `interest`, or the deadline passes.
fn wait(
    fd: &File,
    interest: Interest,
    until: Instant,
    what: &'static str,
    limit: Duration,
) -> Result<(), TransferError> {
    let io = |e: io::Error| TransferError::Io(e.to_string());
    let events = EventLoop::new().map_err(io)?;
    events.add(fd, interest, Pipe::End).map_err(io)?;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransferError::Deadline(what, limit));
        }
        // Readable, writable, hung up or in error: the next call says which.
        if !events.wait(Some(left)).map_err(io)?.is_empty() {
            return Ok(());
        }
    }
}

fn write_all(fd: &File, blob: &[u8], limit: Duration) -> Result<(), TransferError> {
    let until = Instant::now() + limit;
    let mut done = 0;
    while done < blob.len() {
        let rest = &blob[done..];
        // SAFETY: writing from a live buffer of the given length to an fd we hold.
        let n = unsafe { libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => wait(fd, Interest::WRITE, until, "read the state", limit)?,
            io::ErrorKind::BrokenPipe => return Err(TransferError::Closed(done, blob.len())),
            _ => return Err(TransferError::Io(e.to_string())),
        }
    }
    Ok(())
}

fn read_to_end(fd: &File, limit: Duration) -> Result<Vec<u8>, TransferError> {
    let until = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a local buffer of its length from an fd we hold.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            return Ok(out);
        }
        if n > 0 {
            let n = n as usize;
            if out.len() + n > MAX_BLOB {
                return Err(TransferError::Oversized);
            }
            out.extend_from_slice(&buf[..n]);
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => wait(
                fd,
                Interest::READ,
                until,
                "write the state and close its end",
                limit,
            )?,
            _ => return Err(TransferError::Io(e.to_string())),
        }
    }
}

impl Transfer {
    /// Writes `blob` into `fd` (the write end of the frontend's pipe), then closes it.
    pub fn save(fd: File, blob: Vec<u8>, limit: Duration) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        let handle = std::thread::Builder::new()
            .name("state-save".into())
            .spawn(move || write_all(&fd, &blob, limit).map(|()| Vec::new()))?;
        Ok(Transfer {
            load: false,
            handle,
        })
    }

    /// Reads `fd` (the read end of the frontend's pipe) to its end, at most
    /// [`MAX_BLOB`] bytes.
    pub fn load(fd: File, limit: Duration) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        let handle = std::thread::Builder::new()
            .name("state-load".into())
            .spawn(move || read_to_end(&fd, limit))?;
        Ok(Transfer { load: true, handle })
    }

    /// Whether this transfer loads state into the daemon.
    pub fn is_load(&self) -> bool {
        self.load
    }

    /// Whether the thread has ended (its result is ready).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the thread (at most the deadline it was given): the bytes
    /// read for a load, nothing for a save.
    pub fn wait(self) -> Result<Vec<u8>, TransferError> {
        self.handle.join().map_err(|_| TransferError::Thread)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, File) {
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds we own.
        unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) }
    }

    #[test]
    fn a_save_larger_than_the_pipe_completes_while_the_frontend_reads() {
        let (mut rd, wr) = pipe();
        let blob: Vec<u8> = (0..MAX_BLOB).map(|i| i as u8).collect();
        let t = Transfer::save(wr, blob.clone(), TRANSFER_DEADLINE).unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).unwrap();
        assert_eq!(got, blob);
        assert_eq!(t.wait(), Ok(Vec::new()));
    }

    #[test]
    fn a_load_reads_to_the_end_and_refuses_more_than_a_blob() {
        let (rd, mut wr) = pipe();
        let t = Transfer::load(rd, TRANSFER_DEADLINE).unwrap();
        wr.write_all(b"state").unwrap();
        drop(wr);
        assert_eq!(t.wait(), Ok(b"state".to_vec()));

        let (rd, mut wr) = pipe();
        let t = Transfer::load(rd, TRANSFER_DEADLINE).unwrap();
        let _ = wr.write_all(&vec![0u8; MAX_BLOB + 1]);
        drop(wr);
        assert_eq!(t.wait(), Err(TransferError::Oversized));
    }

    #[test]
    fn a_frontend_that_never_closes_or_never_reads_gets_an_error_not_a_hang() {
        let (rd, _wr) = pipe();
        let t = Transfer::load(rd, Duration::from_millis(200)).unwrap();
        assert!(matches!(t.wait(), Err(TransferError::Deadline(..))));
        let (_rd, wr) = pipe();
        let t = Transfer::save(wr, vec![0u8; 1 << 20], Duration::from_millis(200)).unwrap();
        assert!(matches!(t.wait(), Err(TransferError::Deadline(..))));
        let (rd, wr) = pipe();
        drop(rd);
        let t = Transfer::save(wr, vec![1u8; 16], TRANSFER_DEADLINE).unwrap();
        assert_eq!(t.wait(), Err(TransferError::Closed(0, 16)));
    }
}
