//! Landlock: the filesystem paths a confined process may still use, TCP
//! access, and signal and abstract-socket scoping. Shared by the daemons
//! ([`super::Sandbox::enter`]), `bulkhead-vmm` and the launcher.

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{PathAccess, SandboxError};

/// Landlock: every filesystem access right handled, only the policy's paths
/// granted; TCP denied unless the policy needs the network; signals and
/// abstract unix sockets scoped to the sandbox. Best effort on kernels
/// without Landlock (reported, not fatal: seccomp still applies).
///
/// Applies to the calling thread and the threads and processes it creates
/// later, so call it before spawning any.
pub fn restrict(paths: &[PathAccess], needs_network: bool) -> Result<String, SandboxError> {
    restrict_with(AccessFs::from_all(ABI::V7), paths, needs_network)
}

/// Landlock for a process that starts others (the launcher): of the
/// filesystem rights only execution is handled, so it and its children may
/// execute exactly the `PathAccess::Execute` files given (programs and
/// their ELF interpreter) and read and write as before (each child confines
/// itself further); TCP denied unless `needs_network` (a child that talks
/// to a cluster: `bulkhead-blk` on a Ceph RBD image); signals and abstract
/// unix sockets scoped.
pub fn restrict_execution(
    paths: &[PathAccess],
    needs_network: bool,
) -> Result<String, SandboxError> {
    restrict_with(AccessFs::Execute.into(), paths, needs_network)
}

/// What executing `program` opens with execute rights: the file itself and
/// its interpreter (an ELF's `PT_INTERP`, a script's `#!` line), each
/// followed through one level.
pub fn executed_files(program: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = vec![program.to_path_buf()];
    if let Some(interp) = interpreter(program)? {
        let next = interpreter(&interp)?;
        out.push(interp);
        out.extend(next);
    }
    Ok(out)
}

/// The interpreter the kernel loads for `path`, if any.
fn interpreter(path: &Path) -> io::Result<Option<PathBuf>> {
    let mut f = File::open(path)?;
    let mut head = vec![0u8; 4096];
    let n = read_full(&mut f, &mut head)?;
    head.truncate(n);
    if let Some(line) = head.strip_prefix(b"#!") {
        let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
        let word = line
            .split(|&b| b == b' ' || b == b'\t')
            .find(|w| !w.is_empty())
            .unwrap_or_default();
        return Ok((!word.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(word))));
    }
    elf_interpreter(&mut f, &head)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `PT_INTERP` of a 64-bit little-endian ELF whose header is in `head`.
fn elf_interpreter(f: &mut File, head: &[u8]) -> io::Result<Option<PathBuf>> {
    const PT_INTERP: u32 = 3;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed ELF program headers");
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Ok(None);
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let phoff = u64_at(head, 32).ok_or_else(bad)?;
    let phentsize = u64::from(u16_at(54));
    let phnum = u64::from(u16_at(56));
    if phentsize < 56 {
        return Err(bad());
    }
    for i in 0..phnum {
        let off = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(bad)?;
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut ph)?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != PT_INTERP {
            continue;
        }
        let (at, len) = (
            u64_at(&ph, 8).ok_or_else(bad)?,
            u64_at(&ph, 32).ok_or_else(bad)?,
        );
        if len == 0 || len > 4096 {
            return Err(bad());
        }
        let mut name = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut name)?;
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        return Ok(Some(PathBuf::from(OsStr::from_bytes(&name[..end]))));
    }
    Ok(None)
}

fn restrict_with(
    handled: landlock::BitFlags<AccessFs>,
    paths: &[PathAccess],
    needs_network: bool,
) -> Result<String, SandboxError> {
    let abi = ABI::V7;
    let ll = SandboxError::Landlock;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled)
        .map_err(ll)?;
    if !needs_network {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(ll)?;
    }
    let mut created = ruleset
        .scope(Scope::from_all(abi))
        .map_err(ll)?
        .create()
        .map_err(ll)?;
    for p in paths {
        let (path, access) = match p {
            PathAccess::Read(path) => (path, AccessFs::from_read(abi)),
            PathAccess::ReadWrite(path) => (
                path,
                AccessFs::from_read(abi)
                    | AccessFs::WriteFile
                    | AccessFs::Truncate
                    | AccessFs::IoctlDev,
            ),
            PathAccess::Execute(path) => (path, AccessFs::from_read(abi) | AccessFs::Execute),
            PathAccess::Directory(path) => (
                path,
                AccessFs::from_read(abi)
                    | AccessFs::WriteFile
                    | AccessFs::RemoveFile
                    | AccessFs::MakeSock
                    | AccessFs::MakeReg,
            ),
        };
        let fd = PathFd::new(path).map_err(|e| SandboxError::LandlockPath(path.clone(), e))?;
        // Only the rights this ruleset handles (a file rule takes file rights only).
        created = created
            .add_rule(PathBeneath::new(fd, access & handled))
            .map_err(ll)?;
    }
    let status = created.restrict_self().map_err(ll)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => format!("({} paths)", paths.len()),
        RulesetStatus::PartiallyEnforced => {
            format!("partially enforced ({} paths)", paths.len())
        }
        RulesetStatus::NotEnforced => {
            log::warn!(
                "Landlock is not available on this kernel: the filesystem is NOT restricted"
            );
            "not enforced".to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_tests::skip::{SkipReason, skip_if};
    use std::io::ErrorKind;

    /// Runs `f` in a fresh thread (Landlock confines the calling thread only).
    fn in_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn the_ruleset_refuses_a_path_outside_and_grants_the_one_inside() {
        let base = std::env::temp_dir().join(format!("bulkhead-landlock-{}", std::process::id()));
        let inside = base.join("inside");
        let outside = base.join("outside");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(inside.join("f"), b"in").unwrap();
        std::fs::write(outside.join("f"), b"out").unwrap();
        let grant = inside.clone();
        let (status, read_in, read_out, tcp) = in_thread(move || {
            let status = restrict(&[PathAccess::Read(grant.clone())], false).unwrap();
            let read_in = std::fs::read(grant.join("f"));
            let read_out = std::fs::read(grant.parent().unwrap().join("outside/f"));
            let tcp = std::net::TcpListener::bind("127.0.0.1:0");
            (
                status,
                read_in,
                read_out.map_err(|e| e.kind()),
                tcp.map(|_| ()).map_err(|e| e.kind()),
            )
        });
        std::fs::remove_dir_all(&base).unwrap();
        if skip_if(
            "the_ruleset_refuses_a_path_outside_and_grants_the_one_inside",
            (status == "not enforced").then(|| SkipReason::Unsupported("Landlock".into())),
        ) {
            return;
        }
        assert_eq!(read_in.unwrap(), b"in");
        assert_eq!(read_out, Err(ErrorKind::PermissionDenied), "{status}");
        // TCP rules need Landlock ABI 4; older kernels enforce the rest.
        if !status.starts_with("partially") {
            assert_eq!(tcp, Err(ErrorKind::PermissionDenied), "{status}");
        }
    }

    #[test]
    fn execution_is_refused_outside_the_granted_programs() {
        let files = executed_files(Path::new("/bin/true")).unwrap();
        let grants: Vec<_> = files.into_iter().map(PathAccess::Execute).collect();
        let (status, granted, other) = in_thread(move || {
            let status = restrict_execution(&grants, false).unwrap();
            let run = |p: &str| std::process::Command::new(p).status().map_err(|e| e.kind());
            (status, run("/bin/true"), run("/bin/false"))
        });
        if skip_if(
            "execution_is_refused_outside_the_granted_programs",
            (status == "not enforced").then(|| SkipReason::Unsupported("Landlock".into())),
        ) {
            return;
        }
        assert!(granted.unwrap().success(), "{status}");
        assert_eq!(
            other.map(|_| ()),
            Err(ErrorKind::PermissionDenied),
            "{status}"
        );
    }

    #[test]
    fn a_dynamic_program_needs_its_elf_interpreter_and_a_script_its_shell() {
        let files = executed_files(Path::new("/bin/true")).unwrap();
        assert!(files.len() >= 2, "{files:?}");
        assert!(
            files.iter().any(|f| f.to_string_lossy().contains("ld-")),
            "{files:?}"
        );
        let script = std::env::temp_dir().join(format!("bulkhead-script-{}", std::process::id()));
        std::fs::write(&script, "#!/bin/sh -e\nexit 0\n").unwrap();
        let files = executed_files(&script);
        std::fs::remove_file(&script).unwrap();
        let files = files.unwrap();
        assert_eq!(files[0], script);
        assert!(files.contains(&PathBuf::from("/bin/sh")), "{files:?}");
    }

    #[test]
    fn a_missing_path_is_an_error_not_a_silent_grant() {
        let r = in_thread(|| {
            restrict(&[PathAccess::Read("/nonexistent/bulkhead".into())], true).map(|_| ())
        });
        assert!(matches!(r, Err(SandboxError::LandlockPath(..))));
    }
}
