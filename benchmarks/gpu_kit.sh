#!/usr/bin/env bash
# What `snapstore checkpoint` and `snapstore restore` need on a GPU host that reaches no
# package registry (docs/criu.md), gathered on a machine that does, carried, and set up there.
#
#   benchmarks/gpu_kit.sh build [KIT]     here: fills KIT (default gpu-kit/) with
#       whl/     CPython 3.12 manylinux wheels of the Python packages the CRIU path imports
#                (the host's torch environment lacks blake3, zstandard, pyfastcdc, trio);
#       criu/    build/criu/criu (`make criu`), the shared libraries `ldd` lists for it
#                (the host's distribution may lack or differ in them), and criu.sh, which
#                runs it with LD_LIBRARY_PATH set to that directory;
#       fuse/    Debian's libfuse3 (library, headers) and fusermount3, and pyfuse3's source,
#                whose Cython output is compiled there (pyfuse3 publishes no wheel).
#   eval "$(benchmarks/gpu_kit.sh install [KIT])"   there: installs the wheels and pyfuse3
#       into KIT/site and prints the exports: PYTHONPATH (KIT/site and the repository),
#       SNAPSTORE_CRIU, PATH (fusermount3). Progress goes to stderr.
#
# The kit is an ignored directory of the checkout (.gitignore): copy the checkout with it
# to the GPU host.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=(blake3==1.0.11 zstandard==0.25.0 pyfastcdc==0.3.1 trio==0.35.0 outcome==1.3.0.post0
        sniffio==1.3.1 sortedcontainers==2.4.0 attrs==26.1.0 idna==3.20 protobuf==7.36.2
        rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
        typing-extensions==4.16.0)
PYFUSE3=3.5.0
FUSE_DEBS=(libfuse3-3 libfuse3-dev fuse3)

build() {
    local kit=$1 python=${PYTHON:-python3}
    rm -rf "$kit"
    mkdir -p "$kit/whl" "$kit/criu" "$kit/fuse"
    # The GPU host runs CPython 3.12 on x86_64 (glibc 2.39): any manylinux tag up to 2_39.
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$kit/whl" "${WHEELS[@]}"
    "$python" -m pip download --quiet --no-deps --no-binary=:all: -d "$kit/fuse" \
        "pyfuse3==$PYFUSE3"

    (cd "$ROOT" && bash native/criu.sh)
    cp "$ROOT/build/criu/criu" "$kit/criu/criu"
    # Every library but the C library and the loader, which the host has in a newer version.
    ldd "$kit/criu/criu" | awk '$3 ~ /^\// {print $3}' | grep -v -E '/(libc|ld-linux[^/]*)\.so' \
        | while read -r lib; do cp -L "$lib" "$kit/criu/"; done
    cat > "$kit/criu/criu.sh" <<'EOF'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH=$here exec "$here/criu" "$@"
EOF
    chmod +x "$kit/criu/criu.sh"

    local debs
    debs=$(mktemp -d)
    (cd "$debs" && apt-get download "${FUSE_DEBS[@]}" >/dev/null 2>&1)
    for deb in "$debs"/*.deb; do dpkg -x "$deb" "$debs/root"; done
    mkdir -p "$kit/fuse/include" "$kit/fuse/lib" "$kit/fuse/bin"
    cp -r "$debs/root/usr/include/fuse3" "$kit/fuse/include/"
    cp -a "$debs/root/lib/x86_64-linux-gnu/"libfuse3.so.3* "$kit/fuse/lib/"
    cp "$debs/root/bin/fusermount3" "$kit/fuse/bin/"
    rm -rf "$debs"
    du -sh "$kit"
}

install() {
    local kit site python=${PYTHON:-python3}
    kit=$(cd "$1" && pwd)
    site=$kit/site
    rm -rf "$site"
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
        "$kit"/whl/*.whl >&2
    local include suffix src
    include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    if [ -f "$include/Python.h" ] && command -v gcc >/dev/null; then
        src=$(mktemp -d)
        tar xzf "$kit/fuse/pyfuse3-$PYFUSE3.tar.gz" -C "$src"
        src=$src/pyfuse3-$PYFUSE3
        mkdir -p "$site/pyfuse3"
        # The same flags as pyfuse3's own build backend; the sdist carries Cython's C output,
        # so only a C compiler and Python's headers are needed.
        gcc -O2 -shared -fPIC -I"$include" -I"$kit/fuse/include/fuse3" -I"$src/Include" \
            -I"$src/src/pyfuse3" -DFUSE_USE_VERSION=32 "$src/src/pyfuse3/__init__.c" \
            -o "$site/pyfuse3/__init__$suffix" -L"$kit/fuse/lib" -l:libfuse3.so.3 \
            -Wl,-rpath,"$kit/fuse/lib" -lpthread -lrt >&2
        cp "$src/src/pyfuse3/"*.py "$src/src/pyfuse3/py.typed" "$site/pyfuse3/"
        rm -rf "$(dirname "$src")"
    else
        echo "gpu_kit: no Python.h ($include) or no gcc: pyfuse3 not built, no mounts" >&2
    fi
    echo "export PYTHONPATH=$site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    echo "export SNAPSTORE_CRIU=$kit/criu/criu.sh"
    echo "export PATH=$kit/fuse/bin:$PATH"
}

case ${1:-} in
    build) build "${2:-$ROOT/gpu-kit}" ;;
    install) install "${2:-$ROOT/gpu-kit}" ;;
    *) echo "usage: $0 build|install [KIT]" >&2; exit 2 ;;
esac
