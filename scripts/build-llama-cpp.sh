#!/bin/sh
# Builds llama.cpp once, from the sources the pinned llama-cpp-python sdist vendors,
# with this repository's patches to libllama and its server (scripts/llama-*.patch, each
# says why), for both engines:
#   OUT_DIR/         libllama, libggml, libggml-base, libmtmd (llama-cpp-python loads
#                    them through LLAMA_CPP_LIB_PATH and MTMD_CPP_LIB), llama-server and
#                    its own libraries; RUNPATH $ORIGIN.
#   OUT_DIR/cpu/     llama.cpp's CPU backend variants (GGML_BACKEND_DL with
#                    GGML_CPU_ALL_VARIANTS: x64, sse42, ..., haswell, skylakex, icelake,
#                    zen4; not sapphirerapids, below), each built for one CPU family. The entrypoint
#                    scores them against the CPU with llama.cpp's own ggml_backend_score
#                    and names the one to load in GGML_BACKEND_PATH. They sit in a folder
#                    of their own so that llama-server, which searches its own folder,
#                    loads only that one.
# GGML_NATIVE=OFF: the result runs on any x86-64 CPU, not just the build machine's.
#
# usage: build-llama-cpp.sh LLAMA_CPP_SOURCE OUT_DIR [EXTRA_TARGET ...]
#        (the source is patched in place; llama-bench is an extra target for bench/)
set -eu
src=$1 out=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
for patch in "$here"/llama-*.patch; do
    patch -d "$src" -p1 --forward --batch < "$patch" >/dev/null
done
build=$(mktemp -d)
# The compilers' output (thousands of lines of GCC's notes on ggml's AVX-512 code) goes
# to a log; its end is shown if a step fails.
step() { "$@" >>"$build/log" 2>&1 || { tail -40 "$build/log" >&2; echo "build-llama-cpp.sh: failed: $*" >&2; exit 1; }; }
step cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
    -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN;$ORIGIN/..'
# ggml depends on every CPU variant; llama-server links llama, mtmd and ggml.
step cmake --build "$build" --target ggml llama-server "$@" -j"$(nproc)"
mkdir -p "$out/cpu"
cp -a "$build"/bin/libggml-cpu-*.so "$out/cpu/"
# Left out: this llama.cpp's sapphirerapids (AMX) variant dies of SIGILL on a Sapphire
# Rapids VM where AMX itself works (a `tilezero` in its AMX matrix code runs without a
# tile configuration); such CPUs load zen4 (AVX-512 VNNI, BF16) instead.
rm "$out/cpu/libggml-cpu-sapphirerapids.so"
rm -f "$build"/bin/libggml-cpu-*.so
cp -a "$build"/bin/*.so* "$build"/bin/llama-server "$out/"
for target in "$@"; do cp -a "$build/bin/$target" "$out/"; done
rm -rf "$build"
echo "build-llama-cpp.sh: built $out (llama-server, $(ls "$out/cpu" | wc -l) CPU variants)"
