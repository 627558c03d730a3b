# Helpers for guest test scripts, sourced before /test.sh.
# Results go to the console as "@@BULKHEAD CHECK PASS|FAIL <name> [detail]"
# and "@@BULKHEAD VALUE <name> <value>"; the harness parses them.
BULKHEAD_FAILED=0

# pass NAME: records a passed check.
pass() { echo "@@BULKHEAD CHECK PASS $1"; }

# fail NAME DETAIL...: records a failed check.
fail() {
  _n=$1; shift
  echo "@@BULKHEAD CHECK FAIL $_n $*"
  BULKHEAD_FAILED=$((BULKHEAD_FAILED + 1))
}

# value NAME VALUE: reports a value to the host.
value() { echo "@@BULKHEAD VALUE $1 $2"; }

# check NAME CMD...: runs CMD, shows its output, passes if it exits 0.
check() {
  _n=$1; shift
  echo "--- $_n: $*"
  "$@" >/tmp/.check.out 2>&1
  _rc=$?
  cat /tmp/.check.out
  if [ $_rc -eq 0 ]; then
    pass "$_n"
  else
    fail "$_n" "exit $_rc: $(tail -n 3 /tmp/.check.out | tr '\n' ' ')"
  fi
  return $_rc
}

# expect_eq NAME ACTUAL EXPECTED: passes if the two strings are equal.
expect_eq() {
  if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "got '$2', want '$3'"; fi
}

# bulkhead_finish: exits with the number of failed checks (capped at 125).
bulkhead_finish() {
  [ $BULKHEAD_FAILED -gt 125 ] && BULKHEAD_FAILED=125
  exit $BULKHEAD_FAILED
}
