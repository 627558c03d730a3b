//! Fresh ipc, uts and net namespaces (in a user namespace where the daemon
//! is not privileged enough to create them otherwise).

use std::io;

use super::{Policy, Sandbox};

fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fresh ipc, uts and (unless the policy needs it) net namespaces. No pid
/// namespace: it would only apply to children, and once `pid_ns_for_children`
/// differs the kernel refuses `CLONE_THREAD`, i.e. new queue threads. No mount
/// namespace: Landlock already hides the whole filesystem.
pub(super) fn enter_namespaces(policy: &Policy, sb: &mut Sandbox) {
    let mut flags = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !policy.needs_network {
        flags |= libc::CLONE_NEWNET;
    }
    let names = |sb: &mut Sandbox, user: bool| {
        if user {
            sb.namespaces.push("user");
        }
        sb.namespaces.push("ipc");
        sb.namespaces.push("uts");
        if !policy.needs_network {
            sb.namespaces.push("net");
        }
    };
    match unshare(flags) {
        Ok(()) => names(sb, false),
        // Not privileged: a user namespace grants the right to create the others.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            match unshare(libc::CLONE_NEWUSER | flags) {
                Ok(()) => names(sb, true),
                Err(e) => sb
                    .notes
                    .push(format!("no namespaces (user namespace refused: {e})")),
            }
        }
        Err(e) => sb.notes.push(format!("no namespaces ({e})")),
    }
}
