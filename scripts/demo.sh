#!/usr/bin/env bash
# The demo, on a fresh Debian 12 machine: installs a Rust toolchain and a C compiler if
# there are none (Debian's rustc-web; needs root for that only), then runs
#
#   cargo run --release --example demo -- "$@"
#
# An embedded central broker, the real agent on a temporary data dir, a simulated fleet
# over MQTT and sockets, an emulated link that degrades and drops out; a live view, and
# a summary proving every acknowledged message arrived (exit status 1 if not). No root
# needed to run it. Options: --duration 60s, --devices 40, --interval 500ms, --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v cargo >/dev/null 2>&1 || missing+=(rustc-web cargo-web)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: missing: ${missing[*]}; run it once as root (sudo) to install them" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" ca-certificates >/dev/null
fi
exec cargo run --release --example demo -- "$@"
