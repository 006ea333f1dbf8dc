#!/usr/bin/env bash
# The long SIGKILL drill (issue 10): 20 QoS 1 publishers, the central broker restarted
# now and then, the agent SIGKILLed KILLS times (default 50) at random moments; every
# acknowledged message must come out of `edgerelay unpack` exactly once. The test suite
# runs the same drill with 10 kills (tests/tests/torture.rs).
#
#   sudo scripts/torture.sh [KILLS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --bins --features edgerelay/test-hooks
EDGERELAY_TORTURE_KILLS="${1:-50}" cargo test -p edgerelay-tests --test torture -- --nocapture 2>&1 |
  grep -E "^(torture:|test |[0-9]+ kills)|panicked|never reached|printed"
