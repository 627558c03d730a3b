//! One log format for every Bulkhead binary (the three daemons, the VMM and
//! the launcher), aware of the systemd journal.
//!
//! A line is `PROGRAM[PID]: LEVEL message`. When stderr is the journal's
//! stream (a systemd service's default: `JOURNAL_STREAM` names fd 2's
//! device and inode, systemd.exec(5)), a line is `<N>LEVEL message`
//! instead: `<N>` is the sd-daemon(3) priority (3 error, 4 warning, 6 info,
//! 7 debug and trace), which journald takes as the entry's priority so that
//! `journalctl -p warning` filters, and the program and pid are left out
//! because journald records them itself. A stderr that is a pipe to the
//! launcher or a file is not the journal even when the variable was
//! inherited, so its lines stay plain. `RUST_LOG` overrides each binary's
//! default level. See docs/operations.md.

use std::fmt;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};

use log::{Level, LevelFilter};

/// Where the lines go, which decides their form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// A terminal, file or pipe: `PROGRAM[PID]: LEVEL message`.
    Plain,
    /// journald's stream: `<N>LEVEL message`.
    Journal,
}

/// Set once logging knows its stderr is the journal (read by the SIGBUS
/// handler, which can only write raw bytes).
static JOURNAL: AtomicBool = AtomicBool::new(false);

impl Sink {
    /// The journal if `JOURNAL_STREAM` names this process's fd 2, plain
    /// otherwise (also when fd 2 cannot be examined).
    pub fn detect() -> Self {
        let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
            return Sink::Plain;
        };
        Self::for_stream(stream.to_str(), stderr_id().ok())
    }

    /// The journal if `journal_stream` (the variable's value) names `fd2`
    /// (its device and inode).
    pub fn for_stream(journal_stream: Option<&str>, fd2: Option<(u64, u64)>) -> Self {
        match (journal_stream.and_then(parse_journal_stream), fd2) {
            (Some(named), Some(fd2)) if named == fd2 => Sink::Journal,
            _ => Sink::Plain,
        }
    }

    /// The sink detected by the last [`init_logging`] (plain before it).
    pub fn current() -> Self {
        if JOURNAL.load(Ordering::Relaxed) {
            Sink::Journal
        } else {
            Sink::Plain
        }
    }
}

/// `DEV:INODE`, both decimal, as systemd writes `JOURNAL_STREAM`.
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The device and inode of fd 2.
fn stderr_id() -> io::Result<(u64, u64)> {
    let fd = io::stderr().as_fd().try_clone_to_owned()?;
    let meta = std::fs::File::from(fd).metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// The sd-daemon(3) priority of `level`: 3 error, 4 warning, 6 info,
/// 7 debug and trace.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Writes one record as `sink` wants it. In the journal every line of a
/// multi-line message carries the priority (journald reads the prefix of
/// each line); plain, only the first line has the program, pid and level.
pub fn write_record(
    w: &mut dyn Write,
    sink: Sink,
    program: &str,
    pid: u32,
    level: Level,
    message: &fmt::Arguments<'_>,
) -> io::Result<()> {
    match sink {
        Sink::Plain => writeln!(w, "{program}[{pid}]: {level} {message}"),
        Sink::Journal => {
            let text = message.to_string();
            let n = priority(level);
            let mut lines = text.split('\n');
            writeln!(w, "<{n}>{level} {}", lines.next().unwrap_or_default())?;
            for line in lines {
                writeln!(w, "<{n}>{line}")?;
            }
            Ok(())
        }
    }
}

/// The level word of a plain line another Bulkhead process wrote
/// (`bulkhead-blk[42]: WARN ...`), for the launcher, which passes its
/// children's lines on; `None` for a line in another form (QEMU's).
pub fn level_of_plain_line(line: &str) -> Option<Level> {
    let (head, rest) = line.split_once("]: ")?;
    let (program, pid) = head.split_once('[')?;
    if program.is_empty() || program.contains(' ') || pid.parse::<u32>().is_err() {
        return None;
    }
    rest.split(' ').next()?.parse().ok()
}

/// Initialises logging to stderr for `program`: `default_level` unless
/// `RUST_LOG` says otherwise, the form the [`Sink`] that stderr is wants.
///
/// Plain text, never styled: a style check asks the terminal with an ioctl
/// on each line, which the sandbox's filter refuses (a daemon started in a
/// terminal died of SIGSYS at its first line after confinement). Call it
/// before the sandbox: it examines fd 2 once, here.
pub fn init_logging(program: &'static str, default_level: LevelFilter) {
    let sink = Sink::detect();
    JOURNAL.store(sink == Sink::Journal, Ordering::Relaxed);
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(default_level.as_str()),
    )
    .write_style(env_logger::WriteStyle::Never)
    .format(move |buf, record| {
        write_record(
            buf,
            sink,
            program,
            std::process::id(),
            record.level(),
            record.args(),
        )
    })
    .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sink: Sink, level: Level, msg: fmt::Arguments<'_>) -> String {
        let mut out = Vec::new();
        write_record(&mut out, sink, "bulkhead-net", 42, level, &msg).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_plain_line_names_program_pid_and_level() {
        assert_eq!(
            line(Sink::Plain, Level::Info, format_args!("serving {}", "tap0")),
            "bulkhead-net[42]: INFO serving tap0\n"
        );
        assert_eq!(
            line(Sink::Plain, Level::Warn, format_args!("a\nb")),
            "bulkhead-net[42]: WARN a\nb\n"
        );
    }

    #[test]
    fn a_journal_line_starts_with_its_priority_and_leaves_out_program_and_pid() {
        for (level, want) in [
            (Level::Error, "<3>ERROR x\n"),
            (Level::Warn, "<4>WARN x\n"),
            (Level::Info, "<6>INFO x\n"),
            (Level::Debug, "<7>DEBUG x\n"),
            (Level::Trace, "<7>TRACE x\n"),
        ] {
            assert_eq!(line(Sink::Journal, level, format_args!("x")), want);
        }
        let text = line(Sink::Journal, Level::Info, format_args!("serving"));
        assert!(!text.contains("bulkhead-net") && !text.contains("42"));
    }

    #[test]
    fn each_line_of_a_multi_line_message_carries_the_priority_in_the_journal() {
        assert_eq!(
            line(Sink::Journal, Level::Error, format_args!("first\nsecond")),
            "<3>ERROR first\n<3>second\n"
        );
    }

    #[test]
    fn journal_stream_is_dev_colon_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("812345"), None);
        assert_eq!(parse_journal_stream("a:1"), None);
    }

    #[test]
    fn the_level_of_a_childs_plain_line_is_read_back() {
        assert_eq!(
            level_of_plain_line("bulkhead-blk[7]: WARN queue 0 stalled"),
            Some(Level::Warn)
        );
        assert_eq!(
            level_of_plain_line("bulkhead-vmm[7]: ERROR x"),
            Some(Level::Error)
        );
        assert_eq!(level_of_plain_line("qemu-system-x86_64: -m: bad"), None);
        assert_eq!(level_of_plain_line("x[y]: WARN z"), None);
        assert_eq!(level_of_plain_line("bulkhead-blk[7]: serving"), None);
    }

    #[test]
    fn stderr_is_the_journal_only_when_the_variable_names_it() {
        let fd2 = stderr_id().unwrap();
        let named = format!("{}:{}", fd2.0, fd2.1);
        assert_eq!(Sink::for_stream(Some(&named), Some(fd2)), Sink::Journal);
        // Inherited by a process whose stderr is a pipe or a file.
        let other = format!("{}:{}", fd2.0, fd2.1.wrapping_add(1));
        assert_eq!(Sink::for_stream(Some(&other), Some(fd2)), Sink::Plain);
        assert_eq!(Sink::for_stream(None, Some(fd2)), Sink::Plain);
        assert_eq!(Sink::for_stream(Some("junk"), Some(fd2)), Sink::Plain);
        assert_eq!(Sink::for_stream(Some(&named), None), Sink::Plain);
    }
}
