#!/usr/bin/env bash
# Builds the edgerelay .deb for one architecture from an already built binary.
#
#   packaging/deb.sh amd64|arm64|armhf BINARY [OUTDIR]
#
# The binaries come from `cargo build --release` (amd64) or cross/build.sh (arm64,
# armhf); cross/build.sh --deb calls this. dpkg-deb (on every Debian machine) rather than
# cargo-deb: the package is five files and three maintainer scripts, and compiling
# cargo-deb would cost every CI run minutes for it. Prints the path of the .deb.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
arch=${1:?usage: packaging/deb.sh amd64|arm64|armhf BINARY [OUTDIR]}
bin=${2:?usage: packaging/deb.sh amd64|arm64|armhf BINARY [OUTDIR]}
out=${3:-$root/target/deb}
case "$arch" in amd64 | arm64 | armhf) ;; *) echo "packaging/deb.sh: unknown architecture $arch" >&2; exit 2 ;; esac
[ -x "$bin" ] || { echo "packaging/deb.sh: $bin is not an executable" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)

# The newest glibc symbol version the binary links against is the package's libc6
# floor (readelf reads any ELF architecture).
glibc=$(readelf -W --dyn-syms "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
install -D -m 0755 "$bin" "$stage/usr/bin/edgerelay"
install -D -m 0644 "$root/config/edgerelay.toml" "$stage/etc/edgerelay/edgerelay.toml"
install -D -m 0644 "$here/edgerelay.service" "$stage/lib/systemd/system/edgerelay.service"
install -D -m 0644 "$root/README.md" "$stage/usr/share/doc/edgerelay/README.md"
for d in operations local-mqtt wire-format; do
  install -m 0644 "$root/docs/$d.md" "$stage/usr/share/doc/edgerelay/"
done
printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: edgerelay\nLicense: Apache-2.0\n' \
  >"$stage/usr/share/doc/edgerelay/copyright"
mkdir -p "$stage/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "$here/debian/$s" "$stage/DEBIAN/$s"; done
echo /etc/edgerelay/edgerelay.toml >"$stage/DEBIAN/conffiles"
size_kb=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: edgerelay
Version: $version
Architecture: $arch
Maintainer: edgerelay developers <edgerelay@example.invalid>
Installed-Size: $size_kb
Depends: libc6 (>= ${glibc:-2.34}), adduser
Recommends: systemd
Section: net
Priority: optional
Homepage: https://example.invalid/edgerelay
Description: store-and-forward MQTT relay for edge and IoT gateways
 edgerelay accepts device messages (MQTT, TCP/UDP/Unix sockets), commits each
 to an on-disk buffer before acknowledging it, and uploads them to a central
 MQTT broker in compressed batches at a rate adapted to the measured link.
CONTROL
mkdir -p "$out"
deb="$out/edgerelay_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
echo "$deb"
