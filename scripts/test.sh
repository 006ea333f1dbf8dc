#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what the tests need
# (mosquitto, mosquitto-clients, iproute2, ethtool — needs root), then runs every test
# against real brokers, the real binary and real network namespaces (the link lab).
#
#   sudo scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The integration tests run the binary built with test hooks (inert unless a test
# sets their environment variables).
cargo build --workspace --bins --features edgerelay/test-hooks
cargo test --workspace "$@"
