#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the llama-cpp-python sdist, for `make bench LLAMA_SERVER=...`.
#
# Usage: scripts/build_llama_server.sh PIP VERSION DEST
#   PIP      the pip to download the sdist with (e.g. .venv/bin/pip)
#   VERSION  the llama-cpp-python release whose vendor/llama.cpp is built (e.g. 0.3.36)
#   DEST     where the binary lands (e.g. ~/.cache/tokenwire/llama-server/0.3.36/llama-server)
#
# Only the llama-server target is built, natively (GGML_NATIVE=ON), with llama.cpp's own libraries
# linked in (BUILD_SHARED_LIBS=OFF) so the binary stands alone, without OpenSSL or the web UI
# (LLAMA_USE_PREBUILT_UI=OFF also keeps the build from downloading the UI assets). LLAMA_CURL=OFF is
# still passed, though this llama.cpp has deprecated the option (it no longer uses curl). About 6 min
# on 2 cores (measured here, under load); it runs under nice so it does not starve the rest.
#
# AMX: on CPUs with AMX, gcc 12 optimises away the stores that fill the tile config before
# _tile_loadconfig (ggml/src/ggml-cpu/amx/mmq.cpp), so the first tilezero faults with SIGILL (upstream:
# ggml-org/llama.cpp#26954). A compiler barrier before the call keeps the stores; it is patched in
# here, so the AMX path stays on and llama-server needs no --no-repack.
set -euo pipefail

PIP=${1:?usage: build_llama_server.sh PIP VERSION DEST}
VERSION=${2:?usage: build_llama_server.sh PIP VERSION DEST}
DEST=${3:?usage: build_llama_server.sh PIP VERSION DEST}
JOBS=${JOBS:-2}

command -v cmake >/dev/null || { echo "building llama-server needs cmake: apt-get install cmake" \
	"(or pip install cmake into .venv)"; exit 1; }
command -v c++ >/dev/null || { echo "building llama-server needs a C++ compiler: apt-get install g++"; exit 1; }

WORK=$(dirname "$DEST")/src
rm -rf "$WORK" && mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

echo "== downloading the llama-cpp-python $VERSION sdist =="
"$PIP" download -q --no-binary :all: --no-deps -d "$WORK" "llama-cpp-python==$VERSION"
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC=$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp

MMQ=$SRC/ggml/src/ggml-cpu/amx/mmq.cpp
if grep -q '^    _tile_loadconfig(&tc);' "$MMQ"; then
	sed -i 's|^    _tile_loadconfig(&tc);|    __asm__ __volatile__("" : : "r"(\&tc) : "memory");  // tokenwire: keep the tc stores (gcc 12)\n    _tile_loadconfig(\&tc);|' "$MMQ"
	grep -q 'tokenwire: keep the tc stores' "$MMQ"
	echo "== patched a compiler barrier before _tile_loadconfig (the gcc 12 AMX fault) =="
else
	echo "== warning: _tile_loadconfig(&tc) not found in $MMQ; not patched (on an AMX CPU, run with --no-repack if it faults) =="
fi

echo "== configuring (GGML_NATIVE=ON, static, llama-server only) =="
nice -n 19 cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
	-DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
	-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >"$WORK/configure.log" 2>&1 \
	|| { tail -40 "$WORK/configure.log"; exit 1; }

echo "== compiling llama-server with $JOBS jobs (~6 min on 2 cores) =="
nice -n 19 cmake --build "$WORK/build" --target llama-server -j "$JOBS" >"$WORK/build.log" 2>&1 \
	|| { tail -40 "$WORK/build.log"; exit 1; }

mkdir -p "$(dirname "$DEST")"
install -m 755 "$WORK/build/bin/llama-server" "$DEST"
"$DEST" --version 2>&1 | head -2 || true
echo "== llama-server built in $(( ($(date +%s) - start) / 60 )) min: $DEST =="
