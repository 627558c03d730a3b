//! Child processes and scratch directories that clean up after themselves.
//!
//! Every process a test starts is wrapped in a [`ChildGuard`], which kills it
//! by pid (SIGKILL) and reaps it when dropped, even when the test panics, so a
//! leftover daemon or QEMU never breaks the next test or CI run.

use std::io;
use std::os::unix::io::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A spawned child process that is killed and reaped on drop.
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd`, naming it `name` in diagnostics.
    pub fn spawn(name: &str, cmd: &mut Command) -> io::Result<Self> {
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(ChildGuard {
            child: Some(child),
            name: name.to_string(),
        })
    }

    /// Spawns `cmd` with stdin closed and stdout/stderr inherited (shown by the test harness on failure).
    pub fn spawn_quiet(name: &str, cmd: &mut Command) -> io::Result<Self> {
        cmd.stdin(Stdio::null());
        Self::spawn(name, cmd)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Mutable access to the underlying child (for its pipes).
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    /// Returns the exit status if the process has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the process (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let pid = self.pid() as libc::pid_t;
        if pid <= 0 {
            return Ok(());
        }
        // SAFETY: kill(2) with a pid we own; no memory is touched.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills the process with SIGKILL and reaps it, returning its status.
    pub fn kill(&mut self) -> io::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        let _ = child.kill();
        child.wait().map(Some)
    }

    /// Name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `path` exists (a daemon's socket, say), or fails after `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} did not appear within {timeout:?}", path.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Path of a workspace binary built by cargo (`bulkhead-blk`, ...), next to the test executable.
///
/// Integration tests run from `target/<profile>/deps/`; the binaries live one level up.
pub fn workspace_binary(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!(
        "BULKHEAD_BIN_{}",
        name.to_uppercase().replace('-', "_")
    )) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Makes `cmd` start with each `(fd, target)` of `fds` duplicated to fd
/// number `target` (inheritable). The caller keeps the `fd`s open until the
/// command is spawned.
pub fn pass_fds(cmd: &mut Command, fds: Vec<(RawFd, RawFd)>) {
    // SAFETY: only fcntl and dup2 between fork and exec. Every source is first
    // copied above all targets, so a source whose number is another pair's
    // target (or its own: dup2 onto itself would keep close-on-exec) is not
    // lost; dup2 then leaves each target inheritable.
    unsafe {
        cmd.pre_exec(move || {
            let mut staged = Vec::with_capacity(fds.len());
            for &(fd, target) in &fds {
                let tmp = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1000);
                if tmp < 0 {
                    return Err(io::Error::last_os_error());
                }
                staged.push((tmp, target));
            }
            for (tmp, target) in staged {
                if libc::dup2(tmp, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
