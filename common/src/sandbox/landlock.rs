//! Landlock: the filesystem paths a confined process may still use, TCP
//! access, and signal and abstract-socket scoping. Shared by the daemons
//! ([`super::Sandbox::enter`]), `bulkhead-vmm` and the launcher.

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use super::{PathAccess, SandboxError};

/// Landlock: every filesystem access right handled, only the policy's paths
/// granted; TCP denied unless the policy needs the network; signals and
/// abstract unix sockets scoped to the sandbox. Best effort on kernels
/// without Landlock (reported, not fatal: seccomp still applies).
///
/// Applies to the calling thread and the threads and processes it creates
/// later, so call it before spawning any.
pub fn restrict(paths: &[PathAccess], needs_network: bool) -> Result<String, SandboxError> {
    let abi = ABI::V7;
    let ll = SandboxError::Landlock;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
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
        created = created.add_rule(PathBeneath::new(fd, access)).map_err(ll)?;
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
        if status == "not enforced" {
            eprintln!("Landlock unavailable here; nothing to check");
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
    fn a_missing_path_is_an_error_not_a_silent_grant() {
        let r = in_thread(|| {
            restrict(&[PathAccess::Read("/nonexistent/bulkhead".into())], true).map(|_| ())
        });
        assert!(matches!(r, Err(SandboxError::LandlockPath(..))));
    }
}
