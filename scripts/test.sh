#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what the tests need
# (mosquitto, mosquitto-clients, iproute2, ethtool — needs root), then runs every test
# against real brokers, the real binary and real network namespaces (the link lab).
#
#   sudo scripts/test.sh [extra cargo test args]
#
# The 10-minute outage test (tests/tests/outage_sync.rs) spends its time waiting on the
# outage: it starts first and runs beside the build and the rest of the suite; its
# output follows the suite's. The script fails if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The integration tests run the binary built with test hooks (inert unless a test
# sets their environment variables).
cargo build --workspace --bins --features edgerelay/test-hooks
slow_bin=$(cargo test -p edgerelay-tests --test outage_sync --no-run 2>&1 |
  sed -n 's/.*Executable tests\/outage_sync.rs (\(.*\))$/\1/p')
test -x "$slow_bin" || { echo "scripts/test.sh: cannot find the outage_sync test binary" >&2; exit 1; }
slow_bin=$(realpath "$slow_bin")
slow_log=$(mktemp)
# Run as cargo would: from the package's directory.
(cd tests && exec "$slow_bin" --nocapture) >"$slow_log" 2>&1 &
slow=$!
status=0
# The rest of the suite is built while the outage test waits on its outage, at the
# lowest CPU priority so the agent, its fleet and the emulated link come first.
nice -n 19 cargo test --workspace --no-run || status=$?
[ "$status" -ne 0 ] || cargo test --workspace "$@" || status=$?
slow_status=0
wait "$slow" || slow_status=$?
echo "== tests/outage_sync.rs (ran beside the suite)"
cat "$slow_log"
rm -f "$slow_log"
if [ "$slow_status" -ne 0 ]; then
  echo "tests/outage_sync.rs failed (exit $slow_status)" >&2
  status=1
fi
exit "$status"
