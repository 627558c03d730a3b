//! The one way a test skips. [`skip`] prints `SKIPPED <test>: <reason>` and
//! lets the test return; under CI (`CI` set, as CI services set it) a reason
//! CI does not accept fails the test instead, because CI provides root, QEMU,
//! DPDK, qemu-storage-daemon and the nested host (`.ci/install-deps`), so a
//! skip there means a broken machine or a test that silently stopped testing.
//! The accepted reasons are listed in docs/testing.md.

use std::fmt;

/// Why a test cannot run on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Not root: network namespaces, taps and loop devices need it.
    NotRoot,
    /// A program or package the test drives is missing (`.ci/install-deps`
    /// installs every one).
    NotInstalled(String),
    /// The kernel, a device node or a file system here lacks a feature the
    /// test needs (tmpfs, O_DIRECT, io_uring, Landlock, /dev/net/tun, dmesg).
    Unsupported(String),
    /// No usable /dev/kvm for a test that drives KVM directly (the Linux
    /// guests take the nested lane instead, see docs/testing.md).
    NoKvm(String),
}

impl SkipReason {
    /// Whether CI lets a test skip for this reason. Only [`SkipReason::NoKvm`]:
    /// the real-mode KVM tests have no nested lane yet, and a CI runner
    /// without /dev/kvm still runs everything else.
    pub fn ci_accepts(&self) -> bool {
        matches!(self, SkipReason::NoKvm(_))
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotRoot => f.write_str("needs root"),
            SkipReason::NotInstalled(what) => {
                write!(f, "{what} is not installed (run .ci/install-deps)")
            }
            SkipReason::Unsupported(what) => write!(f, "unsupported here: {what}"),
            SkipReason::NoKvm(why) => write!(f, "no usable KVM: {why}"),
        }
    }
}

/// Whether this process runs under CI: `CI` set to anything but empty,
/// `0` or `false`.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// Skips `test` (its name, for the log) for `reason`: prints `SKIPPED
/// <test>: <reason>` and returns, so the caller returns next. Under CI a
/// reason CI does not accept panics instead.
#[track_caller]
pub fn skip(test: &str, reason: SkipReason) {
    // Past libtest's capture, in one write so parallel tests do not
    // interleave their lines.
    skip_in(test, &reason, under_ci(), &mut std::io::stderr());
}

/// [`skip`] when `reason` is `Some`; true when the caller should return.
#[track_caller]
pub fn skip_if(test: &str, reason: Option<SkipReason>) -> bool {
    match reason {
        Some(reason) => {
            skip(test, reason);
            true
        }
        None => false,
    }
}

#[track_caller]
fn skip_in(test: &str, reason: &SkipReason, ci: bool, out: &mut dyn std::io::Write) {
    assert!(
        !ci || reason.ci_accepts(),
        "{test} would be skipped, which CI does not accept: {reason}"
    );
    let _ = out.write_fmt(format_args!("SKIPPED {test}: {reason}\n"));
}

/// Why tests that need root cannot run here, or None.
pub fn needs_root() -> Option<SkipReason> {
    // SAFETY: geteuid has no side effects and cannot fail.
    (unsafe { libc::geteuid() } != 0).then_some(SkipReason::NotRoot)
}

/// Why a test driving `program` cannot run here (it does not start with
/// `--version`), or None.
pub fn needs_program(program: &str) -> Option<SkipReason> {
    match std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        _ => Some(SkipReason::NotInstalled(program.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`skip_in`] prints (nothing reaches this test's stderr, so a
    /// run of the suite shows no SKIPPED line of its own).
    fn printed(reason: &SkipReason, ci: bool) -> String {
        let mut out = Vec::new();
        skip_in("t", reason, ci, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn outside_ci_every_reason_skips_with_one_line() {
        assert_eq!(
            printed(&SkipReason::NotRoot, false),
            "SKIPPED t: needs root\n"
        );
        for r in [
            SkipReason::NotInstalled("x".into()),
            SkipReason::Unsupported("x".into()),
            SkipReason::NoKvm("x".into()),
        ] {
            assert!(printed(&r, false).starts_with("SKIPPED t: "));
        }
    }

    #[test]
    #[should_panic(expected = "CI does not accept")]
    fn under_ci_a_missing_tool_fails_the_test() {
        printed(&SkipReason::NotInstalled("qemu".into()), true);
    }

    #[test]
    #[should_panic(expected = "CI does not accept")]
    fn under_ci_missing_root_fails_the_test() {
        printed(&SkipReason::NotRoot, true);
    }

    #[test]
    fn under_ci_only_missing_kvm_is_accepted() {
        printed(&SkipReason::NoKvm("no /dev/kvm".into()), true);
        assert!(!SkipReason::Unsupported("x".into()).ci_accepts());
    }
}
