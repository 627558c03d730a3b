//! Where a VMM's vCPU threads are, read from `/proc`: inside the kernel's
//! `KVM_RUN` (running the guest, or KVM halting it) or in the VMM's own
//! code. A guest whose CPU stopped making progress (an RCU stall) says
//! nothing about our VMM when that CPU's thread sat in `KVM_RUN` all along:
//! there the guest is the nested host's KVM's to run (see
//! `nested::NestedRun::lane_failure`). It says a lot when the thread was
//! blocked or spinning in `bulkhead-vmm`.

use std::time::Duration;

/// `KVM_RUN` (`_IO(KVMIO, 0x80)`), as `/proc/TID/syscall` shows it.
const KVM_RUN: u64 = 0xae80;
/// `ioctl` on x86-64.
const SYS_IOCTL: u64 = 16;
/// Clock ticks a thread may spend in its own user code between the two
/// samples and still count as inside `KVM_RUN`: tick accounting can charge
/// one tick of the exit path to user time.
const USER_TICKS_SLACK: u64 = 1;
/// The kernel frames of a blocked thread shown in the report.
const STACK_FRAMES: usize = 6;

/// What [`report`] says of a vCPU thread that was inside `KVM_RUN` in both
/// samples; `nested` matches `vcpuN: {INSIDE_KVM_RUN}`.
pub const INSIDE_KVM_RUN: &str = "inside KVM_RUN";

/// One look at one thread.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    name: String,
    state: char,
    /// `/proc/TID/syscall`: `running`, or the syscall number and arguments.
    syscall: String,
    /// Clock ticks: all user time (guest time included), guest time, kernel time.
    utime: u64,
    guest: u64,
    stime: u64,
    stack: Vec<String>,
}

impl Sample {
    /// Whether the thread is in `ioctl(_, KVM_RUN)`, or running (which
    /// `/proc` cannot tell apart from user code; the times decide).
    fn in_kvm_run_or_running(&self) -> bool {
        if self.syscall.trim() == "running" {
            return true;
        }
        let mut f = self.syscall.split_whitespace();
        let nr = f.next().and_then(|n| n.parse::<u64>().ok());
        let request = f.nth(1).and_then(parse_hex);
        nr == Some(SYS_IOCTL) && request == Some(KVM_RUN)
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Parses `/proc/TID/stat`: state, utime, stime and guest_time (fields 3,
/// 14, 15 and 43, counted after the parenthesised name, which may hold spaces).
fn parse_stat(stat: &str) -> Option<(char, u64, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3.
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let state = f.first()?.chars().next()?;
    Some((state, field(14)?, field(15)?, field(43)?))
}

/// `vcpuN`: what `bulkhead-vmm` names its vCPU threads.
fn is_vcpu_name(name: &str) -> bool {
    name.strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The threads of `pid` named `vcpuN`, by name.
fn sample(pid: u32) -> Vec<Sample> {
    let dir = format!("/proc/{pid}/task");
    let Ok(tasks) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let name = read("comm").trim().to_string();
        if !is_vcpu_name(&name) {
            continue;
        }
        let Some((state, utime, stime, guest)) = parse_stat(&read("stat")) else {
            continue;
        };
        let stack = read("stack")
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|s| s.split('+').next().unwrap_or(s).to_string())
            .take(STACK_FRAMES)
            .collect();
        out.push(Sample {
            name,
            state,
            syscall: read("syscall").trim().to_string(),
            utime,
            guest,
            stime,
            stack,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One line per vCPU thread of `pid`, from two samples `gap` apart: inside
/// `KVM_RUN` ([`INSIDE_KVM_RUN`]) both times with no time in its own user
/// code, in and out of it, or outside it; its state, syscall, the
/// CPU time it took in between (guest, own user code, kernel) and, when
/// blocked, its kernel stack. Empty when `/proc` shows no vCPU thread.
pub fn report(pid: u32, gap: Duration) -> String {
    let first = sample(pid);
    std::thread::sleep(gap);
    let second = sample(pid);
    let mut s = String::new();
    for b in &second {
        let Some(a) = first.iter().find(|a| a.name == b.name) else {
            continue;
        };
        s.push_str(&describe(a, b));
        s.push('\n');
    }
    s
}

/// The line [`report`] writes for one thread seen as `a`, then `b`.
fn describe(a: &Sample, b: &Sample) -> String {
    let guest = b.guest.saturating_sub(a.guest);
    let user = b.utime.saturating_sub(a.utime).saturating_sub(guest);
    let kernel = b.stime.saturating_sub(a.stime);
    let place = if !(a.in_kvm_run_or_running() && b.in_kvm_run_or_running()) {
        "outside KVM_RUN"
    } else if user > USER_TICKS_SLACK {
        // A busy guest's exits (serial, MMIO) run our code between runs.
        "in and out of KVM_RUN"
    } else {
        INSIDE_KVM_RUN
    };
    let mut line = format!(
        "{}: {place} (state {}, syscall [{}] then [{}], ticks: guest {guest}, user {user}, kernel {kernel}",
        b.name, b.state, a.syscall, b.syscall
    );
    if !b.stack.is_empty() {
        line.push_str(&format!(", stack {}", b.stack.join(" < ")));
    }
    line.push(')');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(syscall: &str, utime: u64, guest: u64) -> Sample {
        Sample {
            name: "vcpu0".into(),
            state: 'S',
            syscall: syscall.into(),
            utime,
            guest,
            stime: 0,
            stack: Vec::new(),
        }
    }

    #[test]
    fn stat_fields_are_read_after_a_name_with_spaces() {
        let mut stat = String::from("42 (vcpu 0) S");
        // Fields 4 to 43; utime 14 = 7, stime 15 = 3, guest_time 43 = 5.
        for n in 4..=43 {
            let v = match n {
                14 => 7,
                15 => 3,
                43 => 5,
                _ => 0,
            };
            stat.push_str(&format!(" {v}"));
        }
        assert_eq!(parse_stat(&stat), Some(('S', 7, 3, 5)));
        assert_eq!(parse_stat("42 (x) S 1 2"), None);
    }

    #[test]
    fn a_thread_blocked_in_kvm_run_or_running_the_guest_is_inside_kvm() {
        let blocked = at("16 0xd 0xae80 0x0 0x0 0x0 0x0 0x7ffc 0x7f00", 10, 10);
        assert!(describe(&blocked, &blocked).starts_with("vcpu0: inside KVM_RUN"));
        let running = at("running", 110, 110);
        assert!(describe(&blocked, &running).contains(INSIDE_KVM_RUN));
    }

    #[test]
    fn a_thread_in_another_syscall_or_spinning_in_user_code_is_in_the_vmm() {
        let futex = at("202 0x7f00 0x80 0x0 0x0 0x0 0x0 0x7ffc 0x7f00", 10, 10);
        let kvm = at("16 0xd 0xae80 0x0 0x0 0x0 0x0 0x7ffc 0x7f00", 10, 10);
        assert!(!describe(&kvm, &futex).contains(INSIDE_KVM_RUN));
        // Another ioctl on the vCPU fd is not KVM_RUN.
        let regs = at("16 0xd 0x8090ae81 0x0 0x0 0x0 0x0 0x7ffc 0x7f00", 10, 10);
        assert!(!describe(&regs, &regs).contains(INSIDE_KVM_RUN));
        // Running, but the time went to its own user code, not the guest.
        let spin = at("running", 110, 10);
        assert!(describe(&kvm, &spin).starts_with("vcpu0: in and out of KVM_RUN"));
        assert!(describe(&kvm, &futex).starts_with("vcpu0: outside KVM_RUN"));
    }

    #[test]
    fn report_on_this_process_names_only_vcpu_threads() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(move || {
                // Named by now (the thread names itself as it starts).
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(500))
            })
            .unwrap();
        rx.recv().unwrap();
        let r = report(std::process::id(), Duration::from_millis(50));
        t.join().unwrap();
        assert_eq!(r.lines().count(), 1, "{r}");
        assert!(r.starts_with("vcpu7: outside KVM_RUN"), "{r}");
    }
}
