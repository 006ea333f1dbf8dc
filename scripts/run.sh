#!/usr/bin/env bash
# Runs the agent with config/edgerelay.toml on this machine. If nothing listens on the
# example's upstream (127.0.0.1:1883), a local mosquitto is started as a stand-in for
# the central broker. Needs root (data_dir /var/lib/edgerelay, socket in /run).
#
#   sudo scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  echo "starting a local mosquitto on 127.0.0.1:1883 as the central broker"
  mosquitto -d -p 1883
fi
cargo build --release -p edgerelay
echo "watch what arrives upstream with: mosquitto_sub -t 'edgerelay/#' -v"
echo "send a message with: echo hello > /dev/tcp/127.0.0.1/7001"
exec ./target/release/edgerelay run --config config/edgerelay.toml
