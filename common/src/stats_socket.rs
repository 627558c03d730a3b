//! `--stats-socket PATH`: a Unix stream socket on which a daemon answers
//! requests for its [`Stats`], one line each:
//!
//! | request | answer |
//! |---|---|
//! | `stats` | one JSON line ([`Stats::json`]); the connection stays open for the next request |
//! | `metrics` | the Prometheus text format ([`Stats::prometheus`]), then the daemon closes |
//! | `limits` | the I/O limits set now, one JSON line (`{"limits":{"iops-total":500}}`) |
//! | `limit NAME=VALUE,...` | changes those limits at run time ([`Limits::with_changes`]: `0` lifts one, `NAME-max` is a burst); answers `{"ok":true,"limits":{...}}` |
//! | anything else | one `error: ...` line, then the daemon closes |
//!
//! Who may connect may change the limits: the socket's file mode is the
//! boundary (the daemon's umask; the launcher's runtime directory is 0700).
//!
//! One thread of its own serves every client with `poll` on non-blocking
//! sockets, so nothing a client does reaches a queue thread or the
//! vhost-user connection, and no client can hold it: a request line is at
//! most [`MAX_REQUEST`] bytes, at most [`MAX_CLIENTS`] connections are held
//! at once (one more gets `error: busy` and is closed), and a client has
//! [`CLIENT_DEADLINE`] to send each request and read its answer before it
//! is closed.
//!
//! The socket is bound before the sandbox; the thread uses only calls the
//! main thread's seccomp filter allows (`poll`, `accept4`, `read`, `write`,
//! `close`).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::stats::Stats;
use crate::throttle::{LimitNames, Limits, Throttle};

/// A daemon's I/O limits and how it names them ([`crate::VhostUserDevice::limits_control`]).
pub type LimitsControl = (std::sync::Arc<Throttle>, &'static LimitNames);

/// Longest request line accepted, newline included.
pub const MAX_REQUEST: usize = 256;
/// Most clients held at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a client has to send a request line and read the answer.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

/// Why the stats socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StatsSocketError {
    /// The path exists and is not a socket (never removed).
    #[error("--stats-socket {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("--stats-socket {0}: cannot listen")]
    Listen(PathBuf, #[source] io::Error),
    /// The serving thread could not start.
    #[error("stats socket thread")]
    Thread(#[source] io::Error),
}

/// A bound stats socket, not yet served.
pub struct StatsSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl StatsSocket {
    /// Binds `path`, replacing a stale socket left there (a file of another
    /// kind is an error), non-blocking. Call it before the sandbox.
    pub fn bind(path: &Path) -> Result<Self, StatsSocketError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(StatsSocketError::NotASocket(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|e| StatsSocketError::Listen(path.to_owned(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| StatsSocketError::Listen(path.to_owned(), e))?;
        Ok(StatsSocket {
            listener,
            path: path.to_owned(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves the socket on a new thread named `stats-socket` for as long as
    /// the process runs; `stats` is called for each request, `prefix` names
    /// the metrics (`bulkhead-blk` gives `bulkhead_blk_...`).
    pub fn spawn<F>(
        self,
        prefix: &str,
        stats: F,
        limits: Option<LimitsControl>,
    ) -> Result<PathBuf, StatsSocketError>
    where
        F: Fn() -> Stats + Send + 'static,
    {
        let path = self.path.clone();
        let prefix = prefix.to_owned();
        std::thread::Builder::new()
            .name("stats-socket".into())
            .spawn(move || {
                let mut server = Server::new(self.listener, prefix, stats);
                server.limits = limits;
                loop {
                    if let Err(e) = server.turn(CLIENT_DEADLINE) {
                        crate::rate_limited!(log::Level::Warn, "stats socket: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(StatsSocketError::Thread)?;
        Ok(path)
    }
}

/// One client: what it sent so far, what is left to write, its deadline.
struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once `output` is written.
    closing: bool,
    deadline: Instant,
}

impl Client {
    /// Answers with `error` and closes once it is written.
    fn refuse(&mut self, error: &str) {
        self.output = error.as_bytes().to_vec();
        self.closing = true;
    }
}

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Stats,
    Metrics,
    Limits,
    /// The changes, as sent (`NAME=VALUE,...`).
    Limit(String),
}

/// Parses one request line (without its newline).
fn parse(line: &[u8]) -> Result<Request, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line.trim_ascii() {
        b"stats" => Ok(Request::Stats),
        b"metrics" => Ok(Request::Metrics),
        b"limits" => Ok(Request::Limits),
        l => match l.strip_prefix(b"limit ") {
            Some(changes) => std::str::from_utf8(changes)
                .map(|c| Request::Limit(c.trim().to_string()))
                .map_err(|_| "error: limit: not UTF-8\n".to_string()),
            None => Err(
                "error: unknown request; send `stats`, `metrics`, `limits` or `limit NAME=VALUE,...`\n"
                    .into(),
            ),
        },
    }
}

/// The serving state: the listener and the clients held now; the thread
/// calls [`Server::turn`] forever (the unit tests call it by hand).
struct Server<F> {
    listener: UnixListener,
    prefix: String,
    stats: F,
    clients: Vec<Client>,
    /// The limits `limits` and `limit` read and change; None: the daemon has none.
    limits: Option<LimitsControl>,
}

impl<F: Fn() -> Stats> Server<F> {
    fn new(listener: UnixListener, prefix: String, stats: F) -> Self {
        Server {
            listener,
            prefix,
            stats,
            clients: Vec::new(),
            limits: None,
        }
    }

    /// Waits at most `wait` for something to do and does it: accepts,
    /// reads, answers, writes, closes clients past their deadline.
    fn turn(&mut self, wait: Duration) -> io::Result<()> {
        let now = Instant::now();
        let timeout = self
            .clients
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(wait)
            .min(wait);
        let mut fds = vec![libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for c in &self.clients {
            let events = if c.output.is_empty() {
                libc::POLLIN
            } else {
                libc::POLLOUT
            };
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        let ms = libc::c_int::try_from(timeout.as_millis().saturating_add(1)).unwrap_or(1000);
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        // Clients first (their indices match `fds[1..]`), then new ones.
        let now = Instant::now();
        let mut keep = Vec::with_capacity(self.clients.len());
        for (mut c, p) in std::mem::take(&mut self.clients).into_iter().zip(&fds[1..]) {
            if p.revents != 0 && !self.service(&mut c) {
                continue;
            }
            if now >= c.deadline {
                continue;
            }
            keep.push(c);
        }
        self.clients = keep;
        if fds[0].revents != 0 {
            self.accept()?;
        }
        Ok(())
    }

    /// Accepts every waiting connection; past [`MAX_CLIENTS`] each is told
    /// `error: busy` and closed.
    fn accept(&mut self) -> io::Result<()> {
        loop {
            // SAFETY: accept4 on our listening fd; no address is asked for.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    _ => Err(e),
                };
            }
            // SAFETY: accept4 returned a new fd that nothing else owns.
            let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
            if self.clients.len() >= MAX_CLIENTS {
                // Non-blocking: a short line fits any socket buffer; if not,
                // drop it. What the client sent already is read first, so
                // the close is an end of file to it rather than a reset.
                let _ = (&stream).write(b"error: busy, try again\n");
                let _ = (&stream).read(&mut [0u8; MAX_REQUEST]);
                continue;
            }
            self.clients.push(Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                closing: false,
                deadline: Instant::now() + CLIENT_DEADLINE,
            });
        }
    }

    /// Writes, reads and answers what `c` is ready for, one request at a
    /// time; false: close it.
    fn service(&self, c: &mut Client) -> bool {
        loop {
            if !c.output.is_empty() {
                match (&c.stream).write(&c.output) {
                    Ok(n) => {
                        c.output.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(_) => return false,
                }
                if !c.output.is_empty() {
                    return true;
                }
                if c.closing {
                    return false;
                }
                // Answered: the next request gets a fresh deadline.
                c.deadline = Instant::now() + CLIENT_DEADLINE;
            }
            if let Some(end) = c.input.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = c.input.drain(..=end).collect();
                self.answer(c, &line[..end]);
                continue;
            }
            if c.input.len() >= MAX_REQUEST {
                c.output =
                    format!("error: request line longer than {MAX_REQUEST} bytes\n").into_bytes();
                c.closing = true;
                continue;
            }
            let mut buf = [0u8; MAX_REQUEST];
            let room = MAX_REQUEST - c.input.len();
            match (&c.stream).read(&mut buf[..room]) {
                Ok(0) => return false,
                Ok(n) => c.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Puts the answer to request `line` in `c`'s output (nothing for a blank line).
    fn answer(&self, c: &mut Client, line: &[u8]) {
        if line.trim_ascii().is_empty() {
            return;
        }
        match parse(line) {
            Ok(Request::Stats) => {
                let mut text = (self.stats)().json().to_string();
                text.push('\n');
                c.output = text.into_bytes();
            }
            Ok(Request::Metrics) => {
                c.output = (self.stats)().prometheus(&self.prefix).into_bytes();
                c.closing = true;
            }
            Ok(Request::Limits) => match &self.limits {
                Some((t, names)) => {
                    let v = serde_json::json!({"limits": t.limits().to_json(names)});
                    c.output = format!("{v}\n").into_bytes();
                }
                None => c.refuse("error: this daemon has no I/O limits\n"),
            },
            Ok(Request::Limit(changes)) => match self.set_limits(&changes) {
                Ok(now) => {
                    let v = serde_json::json!({"ok": true, "limits": now});
                    c.output = format!("{v}\n").into_bytes();
                }
                Err(e) => c.refuse(&format!("error: limit: {e}\n")),
            },
            Err(e) => c.refuse(&e),
        }
    }

    /// Applies `changes` to the daemon's limits; the limits now, as JSON.
    fn set_limits(&self, changes: &str) -> Result<serde_json::Value, String> {
        let (t, names) = self
            .limits
            .as_ref()
            .ok_or("this daemon has no I/O limits")?;
        let new: Limits = t.limits().with_changes(names, changes)?;
        t.set_limits(new).map_err(|e| e.to_string())?;
        let now = new.to_json(names);
        log::info!("I/O limits set through the stats socket: {now}");
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn server() -> (Server<impl Fn() -> Stats>, PathBuf, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("stats.sock");
        let s = StatsSocket::bind(&path).unwrap();
        let server = Server::new(s.listener, "bulkhead-test".into(), || {
            let mut s = Stats::new();
            s.counter("ok", "Requests completed with OK.", 4);
            s
        });
        (server, path, dir)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "bulkhead-stats-socket-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn turns<F: Fn() -> Stats>(s: &mut Server<F>, n: usize) {
        for _ in 0..n {
            s.turn(Duration::from_millis(20)).unwrap();
        }
    }

    #[test]
    fn stats_answers_json_lines_and_metrics_closes() {
        let (mut s, path, _d) = server();
        let c = UnixStream::connect(&path).unwrap();
        (&c).write_all(b"stats\nstats\r\n").unwrap();
        turns(&mut s, 6);
        let mut r = BufReader::new(&c);
        for _ in 0..2 {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"ok\":4}\n");
        }
        (&c).write_all(b"metrics\n").unwrap();
        turns(&mut s, 4);
        let mut text = String::new();
        r.read_to_string(&mut text).unwrap();
        assert!(text.ends_with("bulkhead_test_ok_total 4\n"), "{text}");
        assert!(s.clients.is_empty());
    }

    #[test]
    fn limits_are_read_and_changed_at_run_time_and_a_bad_change_changes_nothing() {
        use crate::throttle::{BLK_LIMIT_NAMES, Limit};
        let (mut s, path, _d) = server();
        let t = std::sync::Arc::new(Throttle::unlimited());
        s.limits = Some((t.clone(), &BLK_LIMIT_NAMES));
        let c = UnixStream::connect(&path).unwrap();
        (&c).write_all(b"limits\nlimit iops-total=100,iops-total-max=200\nlimits\n")
            .unwrap();
        turns(&mut s, 8);
        let mut r = BufReader::new(&c);
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            lines.push(line);
        }
        assert_eq!(lines[0], "{\"limits\":{}}\n");
        assert_eq!(
            lines[1],
            "{\"limits\":{\"iops-total\":100,\"iops-total-max\":200},\"ok\":true}\n"
        );
        assert_eq!(
            lines[2],
            "{\"limits\":{\"iops-total\":100,\"iops-total-max\":200}}\n"
        );
        assert_eq!(
            t.limits().iops_total,
            Limit {
                rate: 100,
                burst: 200
            }
        );
        // QEMU refuses a total with a per-direction limit: nothing changes.
        (&c).write_all(b"limit iops-read=5\n").unwrap();
        turns(&mut s, 4);
        let mut text = String::new();
        r.read_to_string(&mut text).unwrap();
        assert!(
            text.starts_with("error: limit: iops-total and iops-read"),
            "{text}"
        );
        assert_eq!(t.limits().iops_total.rate, 100);
        assert_eq!(t.limits().iops_read.rate, 0);

        // A daemon without limits says so.
        let (mut s, path, _d) = server();
        let c = UnixStream::connect(&path).unwrap();
        (&c).write_all(b"limit iops-total=1\n").unwrap();
        turns(&mut s, 4);
        let mut text = String::new();
        (&c).read_to_string(&mut text).unwrap();
        assert!(
            text.starts_with("error: limit: this daemon has no I/O limits"),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_or_overlong_request_gets_an_error_line_and_is_closed() {
        let (mut s, path, _d) = server();
        let c = UnixStream::connect(&path).unwrap();
        (&c).write_all(b"shutdown\n").unwrap();
        turns(&mut s, 4);
        let mut text = String::new();
        (&c).read_to_string(&mut text).unwrap();
        assert!(text.starts_with("error: unknown request"), "{text}");

        let c = UnixStream::connect(&path).unwrap();
        (&c).write_all(&[b'x'; MAX_REQUEST * 4]).unwrap();
        turns(&mut s, 4);
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        assert!(line.starts_with("error: request line longer"), "{line}");
        assert!(s.clients.is_empty());
    }

    #[test]
    fn a_silent_client_is_closed_at_its_deadline_and_extra_clients_are_told_busy() {
        let (mut s, path, _d) = server();
        let held: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        turns(&mut s, 2);
        assert_eq!(s.clients.len(), MAX_CLIENTS);
        let extra = UnixStream::connect(&path).unwrap();
        turns(&mut s, 2);
        let mut line = String::new();
        BufReader::new(&extra).read_line(&mut line).unwrap();
        assert_eq!(line, "error: busy, try again\n");
        let start = Instant::now();
        while !s.clients.is_empty() {
            assert!(start.elapsed() < CLIENT_DEADLINE * 2, "silent clients held");
            turns(&mut s, 1);
        }
        let mut rest = Vec::new();
        (&held[0]).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_not_replaced() {
        let d = tempdir::Dir::new();
        let p = d.0.join("f");
        std::fs::write(&p, b"keep").unwrap();
        assert!(matches!(
            StatsSocket::bind(&p),
            Err(StatsSocketError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    }

    #[test]
    fn requests_parse_with_surrounding_space_only() {
        assert_eq!(parse(b" stats "), Ok(Request::Stats));
        assert_eq!(parse(b"metrics\r"), Ok(Request::Metrics));
        assert!(parse(b"stat").is_err());
        assert!(parse(b"\xff").is_err());
    }
}
