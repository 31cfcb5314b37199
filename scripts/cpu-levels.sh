#!/bin/sh
# Builds llama.cpp's CPU backend (libggml-cpu.so) for the CPU levels above the
# llama-cpp-python wheel's own AVX2 build, from the llama.cpp sources the pinned
# sdist vendors, and lays out one folder per level with the whole set of
# libraries, for LLAMA_CPP_LIB_PATH. The entrypoint picks the best folder for
# the CPU it runs on, so one image is fast on AVX-512 and still runs on AVX2.
# Only libggml-cpu differs between levels; the other libraries are the wheel's.
#
# usage: cpu-levels.sh LLAMA_CPP_SOURCE WHEEL_LIB_DIR OUT_DIR [LEVEL ...]
# LEVEL: avx2 (the wheel's), avx512, avx512_vnni, native (this machine; for benchmarks)
set -eu
src=$1 wheel_lib=$2 out=$3
shift 3
[ $# -gt 0 ] || set -- avx2 avx512 avx512_vnni

for level in "$@"; do
    case $level in
        avx2) flags="" ;;
        avx512) flags="-DGGML_AVX512=ON" ;;
        avx512_vnni) flags="-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON" ;;
        native) flags="-DGGML_NATIVE=ON" ;;
        *) echo "cpu-levels.sh: unknown level $level" >&2; exit 2 ;;
    esac
    mkdir -p "$out/$level"
    cp -a "$wheel_lib"/. "$out/$level/"
    [ "$level" = avx2 ] && continue
    build=$(mktemp -d)
    # shellcheck disable=SC2086  # $flags holds several arguments
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF $flags >/dev/null
    cmake --build "$build" --target ggml-cpu -j"$(nproc)" >/dev/null
    cp -a "$build"/bin/libggml-cpu.so* "$out/$level/"
    rm -rf "$build"
    echo "cpu-levels.sh: built $level"
done
