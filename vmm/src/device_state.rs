//! Moving a backend's device state to another backend on a swap: the
//! vhost-user DEVICE_STATE protocol feature (SET_DEVICE_STATE_FD, then
//! CHECK_DEVICE_STATE), over a pipe.
//!
//! Everything the driver set that the rings do not carry (net receive modes
//! and MAC filters, which console ports the guest opened, ...) lives only in
//! the daemon the guest configured; without this a swapped-in daemon starts
//! from its defaults. The blob itself is the backends' business (the
//! daemons validate it on load); the VMM carries it, bounded, and gives up
//! after [`STATE_TIMEOUT`] rather than wait on a backend.
//!
//! Both directions work with a backend that moves the bytes before it
//! replies as well as after: the pipe is made big enough for any blob, and a
//! load's bytes are in the pipe (its write end closed) before the message
//! goes out.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use bulkhead_common::event::{EventLoop, Interest};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use crate::device::DeviceError;

/// Most bytes of device state the VMM takes from a backend.
pub const MAX_STATE: usize = 256 << 10;
/// How long one transfer may take, each direction.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(5);

fn io_err(what: &'static str, e: io::Error) -> DeviceError {
    DeviceError::Backend(format!("device state {what}: {e}"))
}

/// A pipe (read end, write end), close-on-exec, sized for [`MAX_STATE`] where
/// the kernel allows (it keeps its 64 KiB default otherwise).
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned here.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own pipe; a refusal leaves the default size.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, MAX_STATE as libc::c_int) };
    Ok((r, w))
}

/// Makes `f` non-blocking, so a transfer never waits past its deadline.
fn nonblocking(f: &File) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        // SAFETY: as above.
        || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The one fd a transfer waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Pipe,
}
bulkhead_common::event_token!(Token { Pipe });

/// Waits until `f` is ready for `interest` (or hung up) or `deadline` passes.
fn wait(f: &impl AsRawFd, interest: Interest, deadline: Instant) -> io::Result<()> {
    let ev = EventLoop::new()?;
    ev.add(f, interest, Token::Pipe)?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no progress within {STATE_TIMEOUT:?}"),
            ));
        }
        // An empty list is a timeout or EINTR: look at the deadline again.
        if !ev.wait(Some(left.min(Duration::from_secs(1))))?.is_empty() {
            return Ok(());
        }
    }
}

/// Reads `f` to its end, at most [`MAX_STATE`] bytes, by `deadline`.
fn read_all(mut f: File, deadline: Instant) -> io::Result<Vec<u8>> {
    nonblocking(&f)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                if out.len() + n > MAX_STATE {
                    return Err(io::Error::other(format!(
                        "the backend sent more than {MAX_STATE} bytes"
                    )));
                }
                out.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(&f, Interest::READ, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `data[*at..]` into `f` as far as it goes without blocking, or (when
/// `deadline` is given) all of it by then; `*at` advances.
fn write_some(
    f: &mut File,
    data: &[u8],
    at: &mut usize,
    deadline: Option<Instant>,
) -> io::Result<()> {
    while *at < data.len() {
        match f.write(&data[*at..]) {
            Ok(0) => return Err(io::Error::other("the pipe took nothing")),
            Ok(n) => *at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match deadline {
                Some(d) => wait(f, Interest::WRITE, d)?,
                None => return Ok(()),
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes as much of `data` into the pipe's write end `w` as fits without
/// blocking (`*at` advances). All of it: `w` is closed, so a reader sees the
/// end of the data even before it is told to read; the rest is left for
/// later, and `w` is handed back.
fn prefill(mut w: File, data: &[u8], at: &mut usize) -> io::Result<Option<File>> {
    nonblocking(&w)?;
    write_some(&mut w, data, at, None)?;
    Ok((*at < data.len()).then_some(w))
}

/// Asks a stopped backend for its device state (SAVE), then
/// CHECK_DEVICE_STATE. Every ring must already be stopped (GET_VRING_BASE).
pub fn save(fe: &mut Frontend) -> Result<Vec<u8>, DeviceError> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    let (r, w) = pipe().map_err(|e| io_err("pipe", e))?;
    let theirs = fe
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(w),
        )
        .map_err(|e| DeviceError::Vhost("SET_DEVICE_STATE_FD (save)", e))?;
    // The backend may hand back an fd of its own to read from instead.
    let source = theirs.unwrap_or(r);
    let blob = read_all(source, deadline).map_err(|e| io_err("save", e))?;
    fe.check_device_state()
        .map_err(|e| DeviceError::Vhost("CHECK_DEVICE_STATE (save)", e))?;
    Ok(blob)
}

/// Gives a backend whose rings have not started the device state `blob`
/// (LOAD), then CHECK_DEVICE_STATE: an error if the backend refused it.
pub fn load(fe: &mut Frontend, blob: &[u8]) -> Result<(), DeviceError> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    let (r, w) = pipe().map_err(|e| io_err("pipe", e))?;
    let mut at = 0;
    let mut w = prefill(w, blob, &mut at).map_err(|e| io_err("load", e))?;
    let theirs = fe
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(r),
        )
        .map_err(|e| DeviceError::Vhost("SET_DEVICE_STATE_FD (load)", e))?;
    match theirs {
        Some(mut f) => {
            // The backend wants the bytes through its own fd.
            drop(w.take());
            nonblocking(&f).map_err(|e| io_err("load", e))?;
            let mut at = 0;
            write_some(&mut f, blob, &mut at, Some(deadline)).map_err(|e| io_err("load", e))?;
        }
        None => {
            if let Some(w) = w.as_mut() {
                write_some(w, blob, &mut at, Some(deadline)).map_err(|e| io_err("load", e))?;
            }
        }
    }
    drop(w);
    fe.check_device_state()
        .map_err(|e| DeviceError::Vhost("CHECK_DEVICE_STATE (load)", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_all_stops_at_the_end_and_refuses_too_much() {
        let (r, mut w) = pipe().unwrap();
        w.write_all(b"state").unwrap();
        drop(w);
        assert_eq!(
            read_all(r, Instant::now() + STATE_TIMEOUT).unwrap(),
            b"state"
        );

        let (r, w) = pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let chunk = vec![7u8; 64 << 10];
            for _ in 0..(MAX_STATE / chunk.len() + 2) {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        assert!(read_all(r, Instant::now() + STATE_TIMEOUT).is_err());
        writer.join().unwrap();
    }

    #[test]
    fn read_all_gives_up_on_a_writer_that_never_closes() {
        let (r, _w) = pipe().unwrap();
        let started = Instant::now();
        let e = read_all(r, Instant::now() + Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_prefilled_blob_ends_in_eof_with_no_writer_left() {
        let (r, w) = pipe().unwrap();
        let mut at = 0;
        assert!(prefill(w, b"state", &mut at).unwrap().is_none());
        // EOF arrives at once: a writer left open would time out here.
        let got = read_all(r, Instant::now() + Duration::from_millis(500)).unwrap();
        assert_eq!(got, b"state");
    }

    #[test]
    fn a_blob_larger_than_the_pipe_keeps_its_writer_for_the_rest() {
        let (_r, w) = pipe().unwrap();
        let big = vec![3u8; 4 << 20];
        let mut at = 0;
        let w = prefill(w, &big, &mut at).unwrap();
        assert!(w.is_some() && at > 0 && at < big.len());
    }

    #[test]
    fn a_blob_that_fits_the_pipe_is_written_without_a_reader() {
        let (r, mut w) = pipe().unwrap();
        nonblocking(&w).unwrap();
        let blob = vec![1u8; 60 << 10];
        let mut at = 0;
        write_some(&mut w, &blob, &mut at, None).unwrap();
        assert_eq!(at, blob.len());
        drop(w);
        assert_eq!(read_all(r, Instant::now() + STATE_TIMEOUT).unwrap(), blob);
    }
}
