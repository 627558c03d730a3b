# The nested host's /test.sh (tests/src/nested.rs): runs inside a QEMU TCG
# guest whose emulated CPU has AMD SVM with nested paging, so that once
# kvm-amd is loaded /dev/kvm here runs Linux under bulkhead-vmm.
#
# 1. loads the modules of /etc/nested-modules.order (kvm-amd, tun, ...);
# 2. runs the scenario the host put on the kernel command line
#    (bulkhead.nested=BASE64 of a shell script), its output on the console;
# 3. sends what it left under /nested/out, then its exit status, to the
#    second serial port (COM2), which nothing else writes, so kernel messages
#    on the console can never garble a result:
#      @@NESTED FILE <name>      then the file in base64, then
#      @@NESTED END-FILE
#      @@NESTED EXIT <status>
#    Status 200 + N: step N of this script failed (see the console).
results=/dev/ttyS1
# The init mounted a tmpfs over /tmp, which hides what the host carried
# there (a checkout under /tmp, as CI's is); the initramfs is in RAM anyway.
umount /tmp 2>/dev/null
stty -F "$results" raw -echo 2>/dev/null
report() { echo "@@NESTED $*" >"$results"; }

while read -r ko; do
  insmod "$ko" || { echo "nested host: insmod $ko failed"; report "EXIT 201"; return 0; }
done </etc/nested-modules.order
[ -c /dev/kvm ] || { echo "nested host: no /dev/kvm after loading kvm-amd"; report "EXIT 202"; return 0; }
# Shared memory stays without transparent huge pages (the kernel's default,
# shmem_enabled=never), although bulkhead-vmm and QEMU advise them on guest
# RAM: with them a nested guest boots faster, but in CI the packed-ring tour
# triple-faulted in three nested hosts in a row (docs/testing.md).

scenario=""
watchdog=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    bulkhead.nested=*) scenario=${arg#bulkhead.nested=} ;;
    bulkhead.watchdog=*) watchdog=${arg#bulkhead.watchdog=} ;;
  esac
done
[ -n "$scenario" ] || { echo "nested host: no bulkhead.nested= on the command line"; report "EXIT 203"; return 0; }
echo "$scenario" | base64 -d >/nested/scenario.sh || { report "EXIT 204"; return 0; }

# What every user process is doing, shortly before the host's timeout kills
# this machine: one "@@W pid state wchan pending-signals command" line each
# (tests/src/nested.rs reads a SIGKILL still pending from them), the kernel
# stacks of tasks in uninterruptible sleep, and the end of each guest's
# serial log, so a hang says where it hung.
dump_processes() {
  echo "@@NESTED WATCHDOG $(cut -d' ' -f1 /proc/uptime): the scenario still runs"
  for d in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null | cut -c1-120)
    [ -n "$cmd" ] || continue
    st=$(awk '/^State:/ {print $2}' "$d/status" 2>/dev/null)
    pnd=$(awk '/^SigPnd:/ {p=$2} /^ShdPnd:/ {s=$2} END {print p "/" s}' "$d/status" 2>/dev/null)
    echo "@@W ${d#/proc/} $st wchan=$(cat "$d/wchan" 2>/dev/null) pending=$pnd $cmd"
    for t in "$d"/task/*; do
      [ "$(awk '/^State:/ {print $2}' "$t/status" 2>/dev/null)" = D ] || continue
      echo "@@W   task ${t##*/} in D:"; cat "$t/stack" 2>/dev/null | head -n 12
    done
  done
  for f in $(find /tmp -name serial.log 2>/dev/null); do
    echo "@@W serial $f:"; tail -n 15 "$f"
  done
  echo "@@NESTED WATCHDOG END"
}

mkdir -p /nested/out
export PATH=/nested/bin:$PATH BULKHEAD_NESTED_INSIDE=1 BULKHEAD_GUEST_IMAGE=/nested/guest
echo "@@NESTED BEGIN $(cut -d' ' -f1 /proc/uptime)"
wd=""
if [ -n "$watchdog" ]; then
  ( sleep "$watchdog"; dump_processes ) &
  wd=$!
fi
sh /nested/scenario.sh
status=$?
[ -n "$wd" ] && kill "$wd" 2>/dev/null
echo "@@NESTED END $status $(cut -d' ' -f1 /proc/uptime)"

for f in /nested/out/*; do
  [ -f "$f" ] || continue
  report "FILE $(basename "$f")"
  base64 "$f" >"$results"
  report "END-FILE"
done
report "EXIT $status"
