//! Test-only hooks, compiled only with the cargo feature `test-hooks` (never
//! in a normal or release build; each daemon's own `test-hooks` feature turns
//! this one on). `tests/tests/sandbox.rs` and `sandbox_net_console.rs` build
//! hooked daemons into their own target directory (`target/hooked`) to prove
//! that the sandbox stops a daemon that misbehaves.
//!
//! `BULKHEAD_TEST_HOOK` selects what the daemon does right after entering its
//! sandbox, before it serves; each hook reports on stderr, prefixed `test-hook:`.
//! - `socket-inet`: `socket(AF_INET, SOCK_STREAM)`, outside every allow-list
//!   (killed by SIGSYS under `--sandbox enforce`; logged and allowed under `log`);
//! - `open:PATH`: opens PATH read-only and reports the error (Landlock: EACCES).

use std::io;

/// Runs the hook `BULKHEAD_TEST_HOOK` names, if any.
pub fn run_from_env() {
    let Ok(hook) = std::env::var("BULKHEAD_TEST_HOOK") else {
        return;
    };
    if hook == "socket-inet" {
        eprintln!("test-hook: calling socket(AF_INET)");
        // SAFETY: socket takes no pointers; the fd is closed right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            eprintln!("test-hook: socket(AF_INET) returned an fd");
            // SAFETY: closing the fd just created.
            unsafe { libc::close(fd) };
        } else {
            eprintln!(
                "test-hook: socket(AF_INET) failed: {}",
                io::Error::last_os_error()
            );
        }
    } else if let Some(path) = hook.strip_prefix("open:") {
        match std::fs::File::open(path) {
            Ok(_) => eprintln!("test-hook: open {path}: ok"),
            Err(e) => eprintln!(
                "test-hook: open {path}: errno {}",
                e.raw_os_error().unwrap_or(0)
            ),
        }
    } else {
        eprintln!("test-hook: unknown hook {hook:?}");
    }
}
