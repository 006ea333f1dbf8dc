#!/usr/bin/env bash
# Cross-builds edgerelay for an ARM gateway and, with --test, runs its tests under qemu.
#
#   cross/build.sh aarch64|armv7 [--test] [--deb] [--no-release]
#
# Always: the stripped release binary target/cross/<triple>/release/edgerelay (its size
# is printed; over the 6 MB budget fails). --deb: also its .deb in target/deb
# (packaging/deb.sh). --test: the agent's unit tests and the integration tests that need no
# network namespaces, run under qemu-user (cross/config.toml's runner); mosquitto and the
# other peers stay native x86_64 processes. Needs cross/setup.sh (it is run first; as
# root it installs what is missing, otherwise it only checks).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  aarch64) triple=aarch64-unknown-linux-gnu; debarch=arm64; qemu=(qemu-aarch64-static -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib) ;;
  armv7) triple=armv7-unknown-linux-gnueabihf; debarch=armhf; qemu=(qemu-arm-static -L /usr/arm-linux-gnueabihf -E LD_LIBRARY_PATH=/usr/arm-linux-gnueabihf/lib) ;;
  *) echo "usage: cross/build.sh aarch64|armv7 [--test] [--deb] [--no-release]" >&2; exit 2 ;;
esac
shift
run_tests=false
release=true
deb=false
for a in "$@"; do
  case "$a" in
    --test) run_tests=true ;;
    --no-release) release=false ;;
    --deb) deb=true ;;
    *) echo "cross/build.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -eq 0 ]; then
  cross/setup.sh >/dev/null
elif [ ! -f "/usr/lib/rustlib/$triple/.edgerelay-std-version" ]; then
  echo "cross/build.sh: the $triple std is not set up; run: sudo cross/setup.sh" >&2
  exit 1
fi

# Debian's rustc-web, never rustup's: only it can load the unpacked target std.
export PATH="/usr/bin:$PATH" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO=/usr/bin/cargo
# Apart from the host target dir: rustc 1.95 and 1.96 artifacts would rebuild each other.
export CARGO_TARGET_DIR="$PWD/target/cross"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo_x=(/usr/bin/cargo --config cross/config.toml)
t0=$(date +%s)

if $release; then
  "${cargo_x[@]}" build --release --locked --target "$triple" -p edgerelay --bin edgerelay
  bin="$CARGO_TARGET_DIR/$triple/release/edgerelay"
  size=$(stat -c %s "$bin")
  echo "cross/build.sh: $bin: $size bytes ($(( size / 1024 )) KiB) stripped; $(file -b "$bin" | cut -d, -f1-2)"
  # The gateway size budget (issue: release binary <= 6 MB stripped).
  if [ "$size" -gt 6000000 ]; then
    echo "cross/build.sh: the $triple binary is over the 6 MB budget" >&2
    exit 1
  fi
  if $deb; then
    packaging/deb.sh "$debarch" "$bin"
  fi
fi

if $run_tests; then
  # The integration tests spawn the agent: a cross-built one, through a native wrapper
  # that starts it under qemu (no binfmt_misc here, so an ARM program cannot be exec'd
  # directly). The wrapper execs, so the pid the tests signal is the agent's.
  "${cargo_x[@]}" build --locked --target "$triple" -p edgerelay --bin edgerelay --features test-hooks
  wrapper="$CARGO_TARGET_DIR/$triple/debug/edgerelay-qemu"
  printf '#!/bin/sh\nexec %s %q "$@"\n' "${qemu[*]}" "$CARGO_TARGET_DIR/$triple/debug/edgerelay" >"$wrapper"
  chmod +x "$wrapper"
  export EDGERELAY_BIN="$wrapper"
  # Integration tests that need no network namespaces (the link-lab ones need root
  # and veth pairs, and measure timing an emulated CPU would distort).
  no_netns=(backpressure batch_mode cli client_mode crash dead_letters dictionary gaps local_mqtt
    operations outage priority_connection socket_ingest)
  tests=()
  for t in "${no_netns[@]}"; do tests+=(--test "$t"); done
  # Two tests of kernel socket options, skipped by exact name: qemu-user passes
  # TCP_INFO through as a 4-byte int and does not know SO_NETNS_COOKIE. On a real ARM
  # kernel both work; under qemu the agent reports TCP_INFO as unsupported (a short
  # read is an error, not a perfect link) and measures from PUBACKs.
  "${cargo_x[@]}" test --locked --target "$triple" -p edgerelay --lib --bins -- --exact \
    --skip link::sys::tests::reads_a_live_connection --skip link::sys::tests::reads_the_netns_cookie
  "${cargo_x[@]}" test --locked --target "$triple" -p edgerelay-tests "${tests[@]}" -- --test-threads=1
fi
echo "cross/build.sh: $triple done in $(( $(date +%s) - t0 )) s"
