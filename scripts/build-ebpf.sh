#!/usr/bin/env bash
# Builds the eBPF link probe (ebpf/) into the committed object ebpf/probe.bpf.o, and
# records the hash of the sources it was built from in ebpf/probe.bpf.o.sources.
# Ordinary and ARM builds of the agent embed the committed object and need no BPF
# toolchain; only this script does.
#
#   scripts/build-ebpf.sh            rebuild and update the committed object
#   scripts/build-ebpf.sh --check    rebuild into target/ebpf-check, fail if the
#                                    committed object or hash is stale (CI)
#
# Needs (scripts/ebpf-toolchain.sh installs them): Debian's rustc-web and cargo-web
# 1.96, libstd-rust-web-dev-bpf (core for bpfel-unknown-none), llvm-22 (llvm-strip),
# and bpf-linker 0.13.0 built against llvm-22.
set -euo pipefail
cd "$(dirname "$0")/.."

check=false
[ "${1:-}" = "--check" ] && check=true

for tool in /usr/bin/rustc /usr/bin/cargo /usr/lib/llvm-22/bin/llvm-strip; do
  [ -x "$tool" ] || { echo "build-ebpf: $tool is missing (run scripts/ebpf-toolchain.sh)" >&2; exit 1; }
done
[ -d /usr/lib/rustlib/bpfel-unknown-none ] || { echo "build-ebpf: no core for bpfel-unknown-none (apt-get install libstd-rust-web-dev-bpf)" >&2; exit 1; }
command -v bpf-linker >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/bpf-linker" ] || {
  echo "build-ebpf: bpf-linker is missing (scripts/ebpf-toolchain.sh installs it)" >&2; exit 1; }

# Hash of everything the object is built from (this script's flags included), in a
# stable order.
sources_hash() {
  (cd ebpf && find probe probe-common -type f \( -name '*.rs' -o -name Cargo.toml \) | LC_ALL=C sort \
    | while read -r f; do echo "== $f"; cat "$f"; done
   for f in Cargo.toml Cargo.lock .cargo/config.toml ../scripts/build-ebpf.sh; do echo "== $f"; cat "$f"; done) \
    | sha256sum | cut -d' ' -f1
}

out_dir=ebpf
$check && out_dir=target/ebpf-check && mkdir -p "$out_dir"

# aya-ebpf uses a nightly feature gate; RUSTC_BOOTSTRAP scoped to that crate allows it
# on Debian's stable rustc-web.
# The object's BTF line info names source files: map the checkout and the cargo home to
# fixed paths, so the same sources give the same bytes wherever they are built.
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
rustflags="--remap-path-prefix=$PWD/ebpf=/edgerelay/ebpf --remap-path-prefix=$registry=/cargo/registry"
# The BPF backend also copies source lines into the object's BTF, for files it can read:
# core's sources, where Debian's rust-web-src is installed (cross/build-musl.sh installs
# it), would change the bytes. They are hidden from the build in a private mount
# namespace (root only; without root, say so rather than build something else).
hide=()
if compgen -G "/usr/src/rustc-*/library" >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "build-ebpf: core's sources are installed (/usr/src/rustc-*, rust-web-src) and would end up in the object; run this as root (it hides them for the build) or remove rust-web-src" >&2
    exit 1
  fi
  hide=(unshare --mount --propagation private -- sh -c 'for d in /usr/src/rustc-*; do mount -t tmpfs none "$d"; done; exec "$@"' sh)
fi
(cd ebpf && "${hide[@]}" env PATH="/usr/bin:$HOME/.cargo/bin:$PATH" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
  RUSTC_BOOTSTRAP=aya_ebpf CARGO_TARGET_DIR=../target/ebpf \
  CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS="$rustflags" \
  /usr/bin/cargo build --release --locked -p edgerelay-probe)
/usr/lib/llvm-22/bin/llvm-strip --strip-debug \
  -o "$out_dir/probe.bpf.o" target/ebpf/bpfel-unknown-none/release/edgerelay-probe
sources_hash > "$out_dir/probe.bpf.o.sources"

if $check; then
  if ! cmp -s ebpf/probe.bpf.o.sources "$out_dir/probe.bpf.o.sources"; then
    echo "build-ebpf: ebpf/probe.bpf.o is stale: its sources changed since it was built; run scripts/build-ebpf.sh and commit the result" >&2
    exit 1
  fi
  if ! cmp -s ebpf/probe.bpf.o "$out_dir/probe.bpf.o"; then
    echo "build-ebpf: the committed ebpf/probe.bpf.o differs from a fresh build of its sources; run scripts/build-ebpf.sh and commit the result" >&2
    exit 1
  fi
  echo "build-ebpf: the committed object matches its sources ($(cut -c1-12 "$out_dir/probe.bpf.o.sources"))"
else
  echo "build-ebpf: wrote ebpf/probe.bpf.o ($(stat -c %s ebpf/probe.bpf.o) bytes), sources $(cut -c1-12 ebpf/probe.bpf.o.sources)"
fi
