#!/usr/bin/env bash
# Static musl builds of edgerelay for ARM gateways whose glibc is older than the gnu
# builds need (2.34): no dynamic dependency at all.
#
#   cross/build-musl.sh aarch64|armv7 [--check]
#
# Output: target/cross-musl/<triple>/release/edgerelay (stripped; over the 6 MB budget
# fails). --check: also, under qemu-user (a static binary needs no -L sysroot), runs
# `edgerelay check-config` on config/edgerelay.toml, and the daemon itself against a
# native mosquitto: a message published to its local MQTT endpoint must arrive upstream
# and SIGTERM must stop it cleanly (mosquitto, mosquitto-clients: scripts/deps.sh).
#
# The route is unstable Rust, so this is a job of its own, not part of every build:
# Debian ships no musl std for ARM, so the std is built from Debian's rust-web-src with
# `-Z build-std` (RUSTC_BOOTSTRAP=1 on the stable rustc-web 1.96), and zig (the ziglang
# PyPI package, in a venv) is the C compiler (zstd-sys) and the linker: it carries musl
# and libunwind for every target. Needs root the first time (it installs rust-web-src,
# python3-venv and the venv); later runs only check.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  aarch64) triple=aarch64-unknown-linux-musl; zig_target=aarch64-linux-musl; qemu=qemu-aarch64-static ;;
  armv7) triple=armv7-unknown-linux-musleabihf; zig_target=arm-linux-musleabihf; qemu=qemu-arm-static ;;
  *) echo "usage: cross/build-musl.sh aarch64|armv7 [--check]" >&2; exit 2 ;;
esac
check=false
[ "${2:-}" = "--check" ] && check=true

work=${EDGERELAY_CROSS_CACHE:-/var/cache/edgerelay-cross}
zig_version=0.17.1
venv="$work/zig-$zig_version"

if [ "$(id -u)" -eq 0 ]; then
  cross/setup.sh >/dev/null
  missing=()
  for p in rust-web-src python3-venv; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "cross/build-musl.sh: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "cross/build-musl.sh: installing ziglang $zig_version into $venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q "ziglang==$zig_version"
  fi
fi
src=$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library
if [ ! -d "$src/std" ] || [ ! -x "$venv/bin/python" ]; then
  echo "cross/build-musl.sh: rust-web-src or zig missing; run it once as root" >&2
  exit 1
fi
zig="$("$venv/bin/python" -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')/zig"

# zig as cc, ar and linker for the target. Rust adds flags for its own linkers that
# zig's (lld) refuses or does not need; the wrapper drops those.
wrap="$work/zig-wrappers/$triple"
mkdir -p "$wrap"
cat >"$wrap/cc" <<EOF
#!/bin/sh
# zig cc for $zig_target (written by cross/build-musl.sh)
for a in "\$@"; do
  shift
  case "\$a" in
    --target=*|-Wl,--no-undefined-version|-lgcc_s) ;;
    *) set -- "\$@" "\$a" ;;
  esac
done
exec "$zig" cc -target $zig_target "\$@"
EOF
printf '#!/bin/sh\nexec "%s" ar "$@"\n' "$zig" >"$wrap/ar"
chmod +x "$wrap/cc" "$wrap/ar"

export PATH="/usr/bin:$PATH" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO=/usr/bin/cargo
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$PWD/target/cross-musl"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
lower=$(echo "$triple" | tr '-' '_')
export "CARGO_TARGET_${upper}_LINKER=$wrap/cc"
# Static, and linked by zig with its own musl crt and libunwind (the std built here has
# no self-contained objects of its own).
export "CARGO_TARGET_${upper}_RUSTFLAGS=-C target-feature=+crt-static -C link-self-contained=no"
export "CC_${lower}=$wrap/cc" "AR_${lower}=$wrap/ar"
t0=$(date +%s)
/usr/bin/cargo build --release --locked --target "$triple" -p edgerelay --bin edgerelay \
  -Z build-std=std,panic_unwind
bin="$CARGO_TARGET_DIR/$triple/release/edgerelay"
size=$(stat -c %s "$bin")
echo "cross/build-musl.sh: $bin: $size bytes ($(( size / 1024 )) KiB) stripped; $(file -b "$bin" | cut -d, -f1-5)"
if ! file -b "$bin" | grep -q "statically linked"; then
  echo "cross/build-musl.sh: $bin is not statically linked" >&2
  exit 1
fi
if [ "$size" -gt 6000000 ]; then
  echo "cross/build-musl.sh: the $triple binary is over the 6 MB budget" >&2
  exit 1
fi
if $check; then
  "$qemu" "$bin" check-config --config config/edgerelay.toml >/dev/null
  echo "cross/build-musl.sh: check-config under $qemu: ok"
  smoke=$(mktemp -d)
  pids=()
  trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$smoke"' EXIT
  up=$(( 20000 + RANDOM % 20000 )); local_port=$(( up + 1 ))
  printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$up" >"$smoke/mosquitto.conf"
  mosquitto -c "$smoke/mosquitto.conf" >"$smoke/mosquitto.log" 2>&1 & pids+=($!)
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$up") 2>/dev/null && break; sleep 0.1; done
  printf '[agent]\ngateway_id = "gw-musl"\ndata_dir = "%s/data"\n[upstream]\nurl = "mqtt://127.0.0.1:%s"\ntopic_prefix = "up"\nmode = "passthrough"\n[local_mqtt]\nlisten = "127.0.0.1:%s"\n' \
    "$smoke" "$up" "$local_port" >"$smoke/agent.toml"
  mosquitto_sub -p "$up" -t 'up/#' -C 1 -W 30 -v >"$smoke/received" 2>&1 & sub=$!
  "$qemu" "$bin" run --config "$smoke/agent.toml" >"$smoke/agent.log" 2>&1 & agent=$!
  pids+=("$agent")
  for _ in $(seq 300); do grep -q "edgerelay ready" "$smoke/agent.log" && break; sleep 0.1; done
  mosquitto_pub -p "$local_port" -q 1 -t sensors/t1 -m '{"temp":21.5}'
  wait "$sub" || true
  if ! grep -qx 'up/sensors/t1 {"temp":21.5}' "$smoke/received"; then
    echo "cross/build-musl.sh: the message did not arrive upstream; the agent said:" >&2
    cat "$smoke/agent.log" >&2
    exit 1
  fi
  kill -TERM "$agent"
  wait "$agent" || { echo "cross/build-musl.sh: the agent did not stop cleanly on SIGTERM" >&2; exit 1; }
  echo "cross/build-musl.sh: the daemon under $qemu relayed a message and stopped cleanly"
fi
echo "cross/build-musl.sh: $triple done in $(( $(date +%s) - t0 )) s"
