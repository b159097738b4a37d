#!/usr/bin/env bash
# Provides CRIU >= 4 as build/criu/criu without changing the machine's apt configuration:
# the distribution's package where it is >= 4 (Debian 13), otherwise Debian's source
# package built into the project (Debian 12 ships CRIU 3.17, which fails on newer kernels
# with "vdso: Unexpected rt vDSO area bounds"). Run as root from the repository root.
set -euo pipefail

OUT=build/criu
BIN=$OUT/criu
# Debian's orig tarballs this script accepts; apt checks the signed Sources index as well,
# the pin keeps the build reproducible when the suites move on.
declare -A PINNED=(
    [4.2.1]=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
    [4.1.1]=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
)
BUILD_DEPS=(libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
            python3-protobuf libnl-3-dev libnl-route-3-dev libcap-dev libnet1-dev libbsd-dev
            libaio-dev pkg-config libgnutls28-dev uuid-dev)

major_of() { "$1" --version 2>/dev/null | sed -n 's/^Version: \([0-9]*\)\..*/\1/p'; }

usable() { [ -x "$1" ] && [ "$(major_of "$1")" -ge 4 ] 2>/dev/null; }

if usable "$BIN"; then
    exit 0
fi
mkdir -p "$OUT"

candidate=$(apt-cache policy criu 2>/dev/null | sed -n 's/^ *Candidate: \([0-9]*\)\..*/\1/p')
if [ "${candidate:-0}" -ge 4 ] 2>/dev/null; then
    echo "installing CRIU from the distribution"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq criu
    ln -sf "$(command -v criu)" "$BIN"
    usable "$BIN"
    exit 0
fi

echo "building CRIU from Debian's source package (the distribution's is older than 4)"
missing=$(for p in "${BUILD_DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi

src=build/criu-src
rm -rf "$src"
mkdir -p "$src/lists/partial"
printf 'deb-src http://deb.debian.org/debian %s main\n' sid trixie > "$src/sources.list"
apt_private=(-o "Dir::Etc::SourceList=$PWD/$src/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$PWD/$src/lists")
apt-get "${apt_private[@]}" update -qq
versions=$(apt-cache "${apt_private[@]}" showsrc criu | sed -n 's/^Version: //p')
tarball=""
for full in $versions; do
    v=${full%-*}
    if [ -n "${PINNED[$v]:-}" ]; then
        # Only the orig tarball: the build needs nothing from Debian's packaging, whose
        # .debian.tar.xz is sometimes missing from the mirror.
        url=$(apt-get "${apt_private[@]}" source --print-uris criu="$full" \
              | sed -n "s/^'\([^']*criu_${v}\.orig\.tar\.xz\)'.*/\1/p")
        curl -fsSL -o "$src/criu_$v.orig.tar.xz" "$url"
        echo "${PINNED[$v]}  $src/criu_$v.orig.tar.xz" | sha256sum -c --quiet
        tarball=$src/criu_$v.orig.tar.xz
        break
    fi
done
if [ -z "$tarball" ]; then
    echo "error: Debian offers CRIU $versions, none of the pinned versions (${!PINNED[*]});" \
         "add its orig tarball's SHA-256 to native/criu.sh" >&2
    exit 1
fi
tar -xf "$tarball" -C "$src"
make -C "$src"/criu-* -j"$(nproc)" criu >"$src/build.log" 2>&1 || {
    tail -20 "$src/build.log" >&2
    exit 1
}
cp "$src"/criu-*/criu/criu "$BIN"
rm -rf "$src"
usable "$BIN"
echo "CRIU $("$BIN" --version | sed -n 's/^Version: //p') at $BIN"
