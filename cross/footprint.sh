#!/usr/bin/env bash
# Memory footprint of an edgerelay binary, idle and under load, next to the native
# x86_64 build measured the same way in the same run.
#
#   cross/footprint.sh BINARY [qemu-aarch64-static|qemu-arm-static|native]
#
# Starts a native mosquitto as the central broker and the agent (under qemu-user for an
# ARM binary; a gnu one gets the cross sysroot) with its local MQTT endpoint and a
# socket, then reports the agent process's RSS: after start-up (idle), and its peak
# while 20,000 QoS 1 messages go through it (mosquitto_pub -l, one client). Under qemu
# the figure includes the emulator's own memory (its code cache): the line for
# `native` is the agent alone. Needs mosquitto and mosquitto-clients (scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: cross/footprint.sh BINARY [qemu-aarch64-static|qemu-arm-static|native]}
runner=${2:-native}
case "$runner" in
  native) run=() ;;
  qemu-aarch64-static) run=(qemu-aarch64-static -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib) ;;
  qemu-arm-static) run=(qemu-arm-static -L /usr/arm-linux-gnueabihf -E LD_LIBRARY_PATH=/usr/arm-linux-gnueabihf/lib) ;;
  *) echo "cross/footprint.sh: unknown runner $runner" >&2; exit 2 ;;
esac

dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
up=$(( 20000 + RANDOM % 20000 )); local_port=$(( up + 1 ))
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$up" >"$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 & pids+=($!)
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$up") 2>/dev/null && break; sleep 0.1; done
printf '[agent]\ngateway_id = "gw-footprint"\ndata_dir = "%s/data"\n[upstream]\nurl = "mqtt://127.0.0.1:%s"\ntopic_prefix = "up"\n[local_mqtt]\nlisten = "127.0.0.1:%s"\n' \
  "$dir" "$up" "$local_port" >"$dir/agent.toml"
"${run[@]}" "$bin" run --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 & agent=$!
pids+=("$agent")
for _ in $(seq 300); do grep -q "edgerelay ready" "$dir/agent.log" && break; sleep 0.1; done
grep -q "edgerelay ready" "$dir/agent.log" || { cat "$dir/agent.log" >&2; exit 1; }
sleep 2 # settle: the figure is of a started agent with nothing to do
kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$agent/status"; }
idle=$(kib VmRSS)
for i in $(seq 20000); do
  printf '{"device":"dev-%03d","seq":%d,"temp_c":%d.%d,"humidity":%d,"status":"ok"}\n' $(( i % 200 )) "$i" $(( 20 + i % 7 )) $(( i % 10 )) $(( 40 + i % 30 ))
done >"$dir/messages"
t0=$(date +%s.%N)
mosquitto_pub -p "$local_port" -q 1 -t telemetry/fleet -l <"$dir/messages"
t1=$(date +%s.%N)
peak=$(kib VmHWM)
kill -TERM "$agent"
wait "$agent" || true
printf 'footprint: %s (%s): idle RSS %d KiB, peak RSS %d KiB while 20000 QoS 1 messages went through in %.1f s\n' \
  "$(basename "$bin")" "$runner" "$idle" "$peak" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
