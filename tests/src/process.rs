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
use std::sync::Mutex;
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

/// Path of a workspace binary built by cargo (`bulkhead-blk`, ...), next to the test executable,
/// checked fresh (and rebuilt where stale) first. `BULKHEAD_BIN_<NAME>` (`BULKHEAD_BIN_BULKHEAD_BLK`) names another one,
/// taken as it is.
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
    let bin = dir.join(name);
    // The nested host carries fresh builds and neither sources nor cargo.
    if std::env::var_os(crate::nested::INSIDE_ENV).is_none() {
        check_fresh_once(&bin);
    }
    bin
}

/// [`check_fresh`] once per binary and process. A stale or missing binary is
/// rebuilt with `cargo build --workspace --bins` (what `scripts/test` runs;
/// cargo builds for a test only its own package's binaries, and the daemons
/// live in other packages), at most once per process; if that cannot make it
/// fresh, the test panics with why.
fn check_fresh_once(bin: &Path) {
    static CHECKED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static REBUILT: Mutex<bool> = Mutex::new(false);
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.iter().any(|b| b == bin) {
        return;
    }
    if let Err(why) = check_fresh(bin) {
        let mut rebuilt = REBUILT.lock().unwrap_or_else(|e| e.into_inner());
        let built = if *rebuilt {
            Err("already rebuilt once".to_string())
        } else {
            *rebuilt = true;
            // Past libtest's capture: the rebuild shows as it happens.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("{why}: rebuilding the workspace's binaries\n"),
            );
            rebuild(bin)
        };
        if let Err(e) = built.and_then(|()| check_fresh(bin)) {
            panic!("{why}; rebuilding: {e}; run `cargo build --workspace --bins`");
        }
    }
    checked.push(bin.to_path_buf());
}

/// Runs `cargo build --workspace --bins` for the workspace this kit was
/// built from, into the target directory and profile `bin` lives in.
fn rebuild(bin: &Path) -> Result<(), String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let profile_dir = bin.parent().ok_or("no profile directory")?;
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--workspace", "--bins", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null());
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => return Err("no profile name".into()),
    }
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo build {status}"))
    }
}

/// Checks that `bin` exists and is newer than every source file cargo's
/// dep-info (`<bin>.d` beside it) says it was built from, so a test never
/// runs a daemon older than the code it means to test. Without a dep-info
/// file (a binary copied in) there is nothing to compare and it passes.
pub fn check_fresh(bin: &Path) -> Result<(), String> {
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{} is not built ({e})", bin.display()))?;
    let mut dep_info = bin.as_os_str().to_owned();
    dep_info.push(".d");
    let Ok(text) = std::fs::read_to_string(&dep_info) else {
        return Ok(());
    };
    for source in dep_info_sources(&text) {
        match std::fs::metadata(&source).and_then(|m| m.modified()) {
            Ok(t) if t <= built => {}
            Ok(_) => {
                return Err(format!(
                    "{} is older than {}",
                    bin.display(),
                    source.display()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "{} was built from {}, now unreadable ({e})",
                    bin.display(),
                    source.display()
                ));
            }
        }
    }
    Ok(())
}

/// The prerequisites of a Makefile-style dep-info text (`target: a.rs b.rs`,
/// spaces in names escaped with a backslash).
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((_, deps)) = line.split_once(": ") else {
            continue;
        };
        let mut cur = String::new();
        let mut chars = deps.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ' ' => {
                    if !cur.is_empty() {
                        out.push(PathBuf::from(std::mem::take(&mut cur)));
                    }
                }
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            out.push(PathBuf::from(cur));
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::time::SystemTime;

    fn set_mtime(path: &Path, t: SystemTime) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn dep_info_lists_every_source_with_escaped_spaces() {
        let got = dep_info_sources("/t/bin: /w/a.rs /w/my\\ file.rs\n\n/w/a.rs:\n");
        assert_eq!(
            got,
            [PathBuf::from("/w/a.rs"), PathBuf::from("/w/my file.rs")]
        );
    }

    #[test]
    fn a_binary_older_than_one_of_its_sources_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("daemon");
        let src = dir.path().join("main.rs");
        File::create(&bin).unwrap();
        File::create(&src).unwrap();
        std::fs::write(
            dir.path().join("daemon.d"),
            format!("{}: {}\n", bin.display(), src.display()),
        )
        .unwrap();
        let now = SystemTime::now();
        set_mtime(&src, now - Duration::from_secs(10));
        set_mtime(&bin, now);
        check_fresh(&bin).unwrap();
        set_mtime(&src, now + Duration::from_secs(1));
        let err = check_fresh(&bin).unwrap_err();
        assert!(
            err.contains("is older than") && err.contains("main.rs"),
            "{err}"
        );
        std::fs::remove_file(&src).unwrap();
        assert!(check_fresh(&bin).unwrap_err().contains("now unreadable"));
        assert!(
            check_fresh(&dir.path().join("absent"))
                .unwrap_err()
                .contains("is not built")
        );
    }
}
