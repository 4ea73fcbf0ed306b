#!/bin/sh
# Build upstream llama.cpp's `llama-server` once, on the controller, and pack it as a checksummed artifact
# that gpunode ships to nodes (like an air-gapped site's internal mirror would).
#
# Source: the PyPI sdist of llama-cpp-python (MIT), which vendors llama.cpp's source under vendor/llama.cpp.
# The sdist is pinned by version AND sha256; the build is cached under $GPUNODE_BUILD_CACHE/<version>-<sha12>/
# so a rerun with the same source prints the cached artifact and builds nothing.
#
# Usage: scripts/build_llama_server.sh            -> prints the artifact path; its sha256 is in <path>.sha256
# Env:   GPUNODE_BUILD_CACHE (default /var/cache/gpunode/build), PIP (default .venv/bin/pip), JOBS (default nproc)
set -eu

VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

CACHE=${GPUNODE_BUILD_CACHE:-/var/cache/gpunode/build}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PIP=${PIP:-$HERE/.venv/bin/pip}
JOBS=${JOBS:-$(nproc)}
# Build options (part of the cache key): one static program that needs only glibc, so it runs
# on any glibc >= the build machine's; no OpenMP (ggml's own threads), no HTTPS client code.
CMAKE_FLAGS="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF \
-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++\ -static-libgcc"
KEY=$(printf '%s %s' "$SDIST_SHA256" "$CMAKE_FLAGS" | sha256sum | cut -c1-12)
OUT=$CACHE/llama-server-$VERSION-$KEY
ARTIFACT=$OUT/llama-server-$VERSION-linux-x86_64.tar.gz

if [ -s "$ARTIFACT" ] && [ -s "$ARTIFACT.sha256" ] \
    && [ "$(sha256sum "$ARTIFACT" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$ARTIFACT.sha256")" ]; then
    echo "$ARTIFACT"
    exit 0
fi

mkdir -p "$CACHE/src"
SDIST=$CACHE/src/llama_cpp_python-$VERSION.tar.gz
if [ ! -s "$SDIST" ] || [ "$(sha256sum "$SDIST" | cut -d' ' -f1)" != "$SDIST_SHA256" ]; then
    rm -f "$SDIST"
    "$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/src" >&2
fi
echo "$SDIST_SHA256  $SDIST" | sha256sum -c --quiet - >&2

WORK=$(mktemp -d "$CACHE/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
tar -xzf "$SDIST" -C "$WORK"
SRC=$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp

eval "cmake -S \"\$SRC\" -B \"\$WORK/build\" $CMAKE_FLAGS" >&2
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >&2
# Refuse an artifact that would need more than glibc on the node.
extra=$(ldd "$WORK/build/bin/llama-server" | grep -vE 'linux-vdso|libc\.so|libm\.so|ld-linux' || true)
if [ -n "$extra" ]; then echo "llama-server links more than glibc: $extra" >&2; exit 1; fi

STAGE=$WORK/stage
mkdir -p "$STAGE/bin" "$STAGE/share"
install -m 0755 "$WORK/build/bin/llama-server" "$STAGE/bin/llama-server"
strip "$STAGE/bin/llama-server"
install -m 0644 "$SRC/LICENSE" "$STAGE/share/LICENSE"
echo "$VERSION" > "$STAGE/share/VERSION"
# Reproducible tarball: fixed order, owner and mtime.
mkdir -p "$OUT"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$STAGE" -cf - bin share | gzip -n > "$ARTIFACT.tmp"
mv "$ARTIFACT.tmp" "$ARTIFACT"
(cd "$OUT" && sha256sum "$(basename "$ARTIFACT")") > "$ARTIFACT.sha256"
echo "$ARTIFACT"
