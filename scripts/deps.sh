#!/usr/bin/env bash
# Installs the system packages edgerelay's build, tests and demo need on Debian 12.
# Idempotent: installs only what is missing. Needs root for apt-get.
#
#   scripts/deps.sh [extra-package ...]
set -euo pipefail

packages=(mosquitto mosquitto-clients iproute2 ethtool util-linux procps ca-certificates pkg-config gcc binutils python3 python3-paho-mqtt openssl
  adduser systemd "$@")  # adduser, systemd (systemd-analyze), binutils: the .deb test; openssl: the TLS tests' CA
# A machine without a Rust toolchain gets Debian's own (rustc-web, >= 1.85).
command -v cargo >/dev/null 2>&1 || packages+=(rustc-web cargo-web)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/deps.sh: missing Debian packages: ${missing[*]}" >&2
  echo "run this script as root (sudo) so it can install them with apt-get" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Where the mosquitto package starts a system broker on :1883, nothing here minds: the
# tests start their own brokers on free ports.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The tests and scripts/run.sh start their own mosquitto processes; a system broker the
# package just enabled would only hold port 1883 (where edgerelay's local endpoint goes).
if [[ " ${missing[*]} " == *" mosquitto "* ]] && [ -d /run/systemd/system ]; then
  echo "disabling the mosquitto system service the package started (the project runs its own brokers)"
  systemctl disable --now mosquitto.service >/dev/null 2>&1 || true
fi
