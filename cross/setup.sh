#!/usr/bin/env bash
# Installs what the ARM cross builds need on a fresh Debian 12 (x86_64) machine, as root.
# Idempotent: a second run only checks.
#
#   sudo cross/setup.sh
#
# - Debian's rustc-web (1.96): rustup's compilers cannot load Debian's target std (E0514)
#   and rustup here has only the x86_64 std, so the cross builds use /usr/bin/rustc.
# - The aarch64/armv7 std of the same rustc-web version, from the libstd-rust-web-dev
#   packages for arm64/armhf, *unpacked* (only usr/lib/rustlib/<triple>) into
#   /usr/lib/rustlib. Installing them through dpkg multiarch would pull libc6:arm64 and
#   friends, and qemu then mixes the cross ld.so with that libc: threaded programs hang.
#   A private apt state (lists and cache under $work) fetches them without touching the
#   machine's architectures.
# - The Debian cross gcc toolchains (linker, and the C compiler zstd-sys needs) and
#   qemu-user-static to run the test binaries.
set -euo pipefail
work=${EDGERELAY_CROSS_CACHE:-/var/cache/edgerelay-cross}
packages=(rustc-web cargo-web gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user-static binutils-aarch64-linux-gnu
  binutils-arm-linux-gnueabihf dpkg-dev)

if [ "$(id -u)" -ne 0 ]; then
  echo "cross/setup.sh: run as root (it installs Debian packages and writes /usr/lib/rustlib)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "cross/setup.sh: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The target std must be the exact version of the host rustc-web: a std from another
# version fails with E0514 (or, worse, an index falling back to an older one would).
version=$(dpkg-query -W -f='${Version}' rustc-web)
declare -A triple=([arm64]=aarch64-unknown-linux-gnu [armhf]=armv7-unknown-linux-gnueabihf)
need=()
for arch in arm64 armhf; do
  stamp=/usr/lib/rustlib/${triple[$arch]}/.edgerelay-std-version
  [ "$(cat "$stamp" 2>/dev/null)" = "$version" ] || need+=("$arch")
done
if [ ${#need[@]} -gt 0 ]; then
  mkdir -p "$work"/{lists/partial,cache/archives/partial,dl}
  apt_x=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o APT::Architectures::=armhf
    -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Dir::State::status=/dev/null -o APT::Sandbox::User=root)
  apt-get "${apt_x[@]}" update -qq
  for arch in "${need[@]}"; do
    t=${triple[$arch]}
    echo "cross/setup.sh: unpacking the $t std of rustc-web $version"
    rm -f "$work"/dl/*.deb
    (cd "$work/dl" && apt-get "${apt_x[@]}" download -qq "libstd-rust-web-dev:$arch=$version")
    deb=$(ls "$work"/dl/libstd-rust-web-dev_*_"$arch".deb)
    rm -rf "$work/x" && mkdir -p "$work/x"
    dpkg-deb -x "$deb" "$work/x"
    src="$work/x/usr/lib/rustlib/$t"
    [ -d "$src/lib" ] || { echo "cross/setup.sh: $deb has no usr/lib/rustlib/$t" >&2; exit 1; }
    rm -rf "/usr/lib/rustlib/$t"
    mkdir -p /usr/lib/rustlib
    cp -a "$src" "/usr/lib/rustlib/$t"
    echo "$version" >"/usr/lib/rustlib/$t/.edgerelay-std-version"
    rm -rf "$work/x"
  done
fi
echo "cross/setup.sh: ready (rustc-web $version; targets ${triple[arm64]}, ${triple[armhf]})"
