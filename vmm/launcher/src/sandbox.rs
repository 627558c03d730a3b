//! The launcher's confinement (`bulkhead up --sandbox enforce|log|off`),
//! applied once the config is read and every program found, before the
//! first child starts. Everything here is inherited by the daemons, the VMM
//! and QEMU, which confine themselves further:
//!
//! - `no_new_privs`;
//! - a seccomp filter refusing (EPERM; `log`: only logged) the calls no
//!   Bulkhead process needs ([`bulkhead_common::sandbox::seccomp::NEVER`]:
//!   ptrace, module and kexec loading, mount, reboot, keyrings, ...). It is a
//!   deny-list, not an allow-list: the launcher runs whatever the children
//!   need, and each child installs its own allow-list;
//! - Landlock: only the programs it starts (and their ELF interpreter) may
//!   be executed; no TCP, unless a backend needs it (a `bulkhead-blk`
//!   serving an `rbd:` image talks to the Ceph monitors and OSDs, and
//!   Landlock domains are inherited across exec); signals and abstract
//!   unix sockets scoped. Reads and writes stay open: each child restricts
//!   its own paths.

use std::path::PathBuf;

use bulkhead_common::sandbox::{PathAccess, SandboxError, SandboxMode, landlock, seccomp};

/// Why the launcher could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum LauncherSandboxError {
    /// A program's interpreter could not be read.
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// `no_new_privs` failed.
    #[error("PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] std::io::Error),
    /// Landlock or seccomp refused.
    #[error("Sandbox")]
    Sandbox(#[from] SandboxError),
}

/// The files the launcher's Landlock domain lets it execute: each of
/// `programs` and its interpreter.
pub fn executable_files(programs: &[PathBuf]) -> Result<Vec<PathBuf>, LauncherSandboxError> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in programs {
        for f in
            landlock::executed_files(p).map_err(|e| LauncherSandboxError::Read(p.clone(), e))?
        {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// Confines the launcher (and so everything it starts) as the module docs
/// say, leaving TCP to the children if `needs_network`; returns a line for
/// the log. Call it before starting any child.
pub fn enter(
    mode: SandboxMode,
    programs: &[PathBuf],
    needs_network: bool,
) -> Result<String, LauncherSandboxError> {
    if mode == SandboxMode::Off {
        return Ok("sandbox off: the launcher and its children run unconfined by it".into());
    }
    let files = executable_files(programs)?;
    let grants: Vec<PathAccess> = files.iter().cloned().map(PathAccess::Execute).collect();
    let filter = seccomp::deny_list(seccomp::NEVER, mode == SandboxMode::Log)?;
    let ll = landlock::restrict_execution(&grants, needs_network)?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(LauncherSandboxError::NoNewPrivs(
            std::io::Error::last_os_error(),
        ));
    }
    seccomp::install(&filter)?;
    Ok(format!(
        "sandbox {mode:?}: no_new_privs, {} calls refused, Landlock {ll} ({} executable files{})",
        seccomp::NEVER.len(),
        files.len(),
        if needs_network {
            ", TCP left to the children: an RBD image"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_brings_its_interpreter_once() {
        let files = executable_files(&["/bin/true".into(), "/bin/false".into()]).unwrap();
        assert_eq!(files[0], PathBuf::from("/bin/true"));
        let interps = files
            .iter()
            .filter(|f| f.to_string_lossy().contains("ld-"))
            .count();
        assert_eq!(interps, 1, "{files:?}");
    }

    #[test]
    fn a_missing_program_is_an_error() {
        assert!(matches!(
            executable_files(&["/nonexistent/bulkhead-blk".into()]),
            Err(LauncherSandboxError::Read(..))
        ));
    }
}
