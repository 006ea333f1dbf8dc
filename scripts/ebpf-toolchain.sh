#!/usr/bin/env bash
# Installs what rebuilding the eBPF probe needs (scripts/build-ebpf.sh) on Debian 12:
# Debian's rustc-web 1.96 with core for bpfel-unknown-none, LLVM 22, and bpf-linker
# 0.13.0 built against it. Not needed to build or run the agent: the compiled probe is
# committed. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22 llvm-22-dev
if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  echo "installing bpf-linker 0.13.0 (against llvm-22)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked \
    --no-default-features --features llvm-22 --quiet
fi
