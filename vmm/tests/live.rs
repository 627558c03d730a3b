//! Backends replaced under a running Linux guest, with its own drivers, the
//! default sandbox everywhere:
//!
//! - blk: while the guest runs fio with crc32c verification from both
//!   vCPUs, `bulkhead-vmm ctl swap` moves the disk to a second
//!   `bulkhead-blk` on the same image, which is then SIGKILLed and
//!   restarted on its socket; fio verifies every block written across the
//!   swap and the restart and in one more round after them, and the guest's
//!   kernel logs no I/O error;
//! - net and console: both backends are SIGKILLed, stay dead for a second
//!   while the guest keeps writing numbered lines to hvc0, and are
//!   restarted; the guest's ping works again, and every line it wrote,
//!   before, during and after, reaches the console's host socket.
//!
//! These need a KVM that runs Linux: where `bulkhead-vmm probe` fails they
//! run inside the nested host (`nested::delegate`, tests/src/nested.rs).

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod linux;

use std::time::{Duration, Instant};

use bulkhead_tests::nested;
use linux::{GUEST_ADDR, Options, TAP_ADDR, Vm};

/// How long a killed backend stays dead before its restart.
const DEAD_TIME: Duration = Duration::from_secs(1);
/// How long the swapped-in backend serves before it is killed.
const SERVE_TIME: Duration = Duration::from_secs(2);
/// How long the VMM may take to reconnect to a restarted backend.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest side of the blk test: fio rounds in the background until the
/// host has swapped, killed and restarted the backend, then one more round.
const BLK_SCRIPT: &str = r#"
check vda_present test -b /dev/vda
(
  r=0
  while :; do
    if ! fio --name=live --filename=/dev/vda --offset=8M --size=8M --offset_increment=8M \
        --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split --rw=randwrite --bs=4k \
        --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 \
        --group_reporting >/tmp/fio.out 2>&1; then
      echo FAIL >/tmp/fio.status
      cat /tmp/fio.out
      exit 1
    fi
    r=$((r + 1))
    echo $r >/tmp/fio.rounds
    [ -f /tmp/fio.stop ] && break
  done
  echo OK >/tmp/fio.status
) &
loop=$!
sleep 1
phase fio-running
check host_swapped_and_restarted await_host restarted
value rounds_when_host_done "$(cat /tmp/fio.rounds 2>/dev/null || echo 0)"
touch /tmp/fio.stop
wait $loop
check fio_verify_across_swap_and_restart test "$(cat /tmp/fio.status)" = OK
value fio_rounds "$(cat /tmp/fio.rounds)"
check fio_verify_after_restart fio --name=after --filename=/dev/vda --offset=8M --size=8M \
  --offset_increment=8M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
  --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c \
  --verify_fatal=1 --group_reporting
check no_io_error_in_dmesg sh -c '! dmesg | grep -i -E "I/O error|blk_update_request|critical"'
dmesg | grep -i -E "I/O error|blk_update_request|critical" | head -5
"#;

/// `list` until every device is connected again after `reconnects_before`
/// reconnections of `id`; returns the last reply.
fn wait_reconnected(vm: &mut Vm, id: &str, reconnects_before: u64) -> serde_json::Value {
    let deadline = Instant::now() + RECONNECT_TIMEOUT;
    let mut last = serde_json::Value::Null;
    let done = vm.wait_until(|vm| {
        if let Ok(list) = vm.ctl(&["list"]) {
            let devs = list["devices"].as_array().cloned().unwrap_or_default();
            let all = devs.iter().all(|d| d["state"] == "connected");
            let dev = devs.iter().find(|d| d["id"] == id);
            let again = dev.is_some_and(|d| d["reconnects"].as_u64() > Some(reconnects_before));
            last = list;
            if all && again {
                return true;
            }
        }
        Instant::now() >= deadline
    });
    assert!(
        done && Instant::now() < deadline,
        "{id} was not reconnected within {RECONNECT_TIMEOUT:?}: {last}\n{}",
        vm.vmm_log()
    );
    last
}

/// The `list` entry of device `id`.
fn device(list: &serde_json::Value, id: &str) -> serde_json::Value {
    list["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == id).cloned())
        .unwrap_or_else(|| panic!("no {id} in {list}"))
}

#[test]
fn blk_swapped_then_killed_and_restarted_under_linux_fio_verify_loses_no_io() {
    if nested::delegate("blk_swapped_then_killed_and_restarted_under_linux_fio_verify_loses_no_io")
    {
        return;
    }
    let opts = Options {
        transport: "pci",
        cpus: 2,
        blk_queues: 2,
        ..Options::default()
    };
    let mut vm = Vm::boot(opts, |_| BLK_SCRIPT.to_string());
    vm.await_phase("fio-running");

    let second = vm.backends.second_blk();
    let new_socket = second.socket().to_string_lossy().into_owned();
    let reply = vm
        .ctl(&["swap", "blk0", "--socket", &new_socket])
        .expect("ctl swap");
    assert_eq!(reply["ok"], true, "swap: {reply}\n{}", vm.vmm_log());
    vm.backends.replace_blk(second);
    let list = vm.ctl(&["list"]).expect("ctl list");
    let blk0 = device(&list, "blk0");
    assert_eq!(
        blk0["socket"],
        new_socket.as_str(),
        "after the swap: {list}"
    );
    eprintln!("swapped blk0 to {new_socket}: bases {}", reply["bases"]);

    vm.pause(SERVE_TIME);
    let before = blk0["reconnects"].as_u64().unwrap_or(0);
    let pid = vm.backends.restart_blk();
    let list = wait_reconnected(&mut vm, "blk0", before);
    eprintln!(
        "SIGKILLed the swapped-in bulkhead-blk and restarted it as pid {pid}: {}",
        device(&list, "blk0")
    );
    vm.pause(SERVE_TIME);
    vm.tell_guest("restarted");

    let boot = vm.finish();
    let rounds = |name: &str| -> u64 {
        boot.run
            .value(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (at_host, total) = (rounds("rounds_when_host_done"), rounds("fio_rounds"));
    boot.assert_passed(
        "blk swap, then SIGKILL and restart, under fio verify",
        Vec::new(),
    );
    eprintln!(
        "fio: {total} verified rounds across the swap and restart ({at_host} done before the \
         host was), one more after"
    );
}

/// The guest side of the net and console test.
fn net_console_script() -> String {
    format!(
        r#"
check eth0_up ip link set eth0 up
check eth0_addr ip addr add {GUEST_ADDR}/24 dev eth0
check ping_before ping -c 2 -W 5 {TAP_ADDR}
i=0
while [ ! -c /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check hvc0_present test -c /dev/hvc0
# Numbered lines to hvc0 until the host is done, then 20 more.
(
  i=0
  stop=-1
  while [ $i -ne $stop ]; do
    echo "CONSOLE-LINE-$i" >/dev/hvc0
    i=$((i + 1))
    [ $stop -lt 0 ] && [ -f /tmp/stop ] && stop=$((i + 20))
    sleep 0.05
  done
  echo $i >/tmp/lines
) &
writer=$!
sleep 1
phase kill
check host_restarted await_host restarted
check ping_after_restart ping -c 3 -W 5 {TAP_ADDR}
touch /tmp/stop
wait $writer
value console_lines "$(cat /tmp/lines)"
"#
    )
}

#[test]
fn net_and_console_killed_and_restarted_under_linux_ping_resumes_and_no_output_is_lost() {
    if nested::delegate(
        "net_and_console_killed_and_restarted_under_linux_ping_resumes_and_no_output_is_lost",
    ) {
        return;
    }
    let opts = Options {
        transport: "pci",
        cpus: 2,
        ..Options::default()
    };
    let mut vm = Vm::boot(opts, |b| {
        assert!(
            b.net.is_some(),
            "this test needs bulkhead-net (root, for a network namespace)"
        );
        net_console_script()
    });
    vm.await_phase("kill");
    let list = vm.ctl(&["list"]).expect("ctl list");
    let reconnects = |id: &str| device(&list, id)["reconnects"].as_u64().unwrap_or(0);
    let (net_before, console_before) = (reconnects("net0"), reconnects("console0"));
    let seen_before = vm.hvc0.text().matches("CONSOLE-LINE-").count();

    vm.backends
        .net
        .as_mut()
        .expect("net")
        .kill()
        .expect("kill bulkhead-net");
    vm.backends.console.kill().expect("kill bulkhead-console");
    vm.pause(DEAD_TIME);
    let net_pid = vm.backends.restart_net();
    let console_pid = vm.backends.restart_console();
    wait_reconnected(&mut vm, "net0", net_before);
    let list = wait_reconnected(&mut vm, "console0", console_before);
    eprintln!(
        "net and console SIGKILLed with {seen_before} console lines read, restarted as pids \
         {net_pid} and {console_pid}: {} / {}",
        device(&list, "net0"),
        device(&list, "console0")
    );
    vm.tell_guest("restarted");

    let boot = vm.finish();
    let lines: usize = boot
        .run
        .value("console_lines")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut problems = Vec::new();
    let missing: Vec<usize> = (0..lines)
        .filter(|i| {
            !boot
                .hvc0
                .lines()
                .any(|l| l.trim() == format!("CONSOLE-LINE-{i}"))
        })
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} of the guest's {lines} console lines never reached the host: {missing:?}",
            missing.len()
        ));
    }
    if lines <= seen_before + 20 {
        problems.push(format!(
            "the guest wrote {lines} lines, {seen_before} of them before the kill: too few after it"
        ));
    }
    boot.assert_passed("net and console SIGKILLed and restarted", problems);
    eprintln!("console: all {lines} lines arrived ({seen_before} before the kill)");
}
