#!/usr/bin/env bash
# Runs the agent with config/edgerelay.toml on this machine. If nothing listens on the
# example's upstream (127.0.0.1:1884), a mosquitto is started there as a stand-in for
# the central broker. The agent itself is the local MQTT broker on 127.0.0.1:1883.
# Needs root (data_dir /var/lib/edgerelay, socket in /run).
#
#   sudo scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if ! (exec 3<>/dev/tcp/127.0.0.1/1884) 2>/dev/null; then
  echo "starting a mosquitto on 127.0.0.1:1884 as the central broker"
  mosquitto -d -p 1884
fi
if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  echo "something already listens on 127.0.0.1:1883 (a system mosquitto?): edgerelay is the" >&2
  echo "local MQTT broker in this example; stop that one or change [local_mqtt] listen" >&2
  exit 1
fi
cargo build --release -p edgerelay
echo "watch what arrives upstream: ./target/release/edgerelay unpack --broker mqtt://127.0.0.1:1884 --jsonl"
echo "publish like a device:        mosquitto_pub -p 1883 -q 1 -t sensors/t1 -m 21.5"
echo "or over a socket:             echo hello > /dev/tcp/127.0.0.1/7001"
exec ./target/release/edgerelay run --config config/edgerelay.toml
