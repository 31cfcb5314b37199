#!/bin/sh
# Builds llama.cpp's own server (tools/server) from the llama.cpp sources the
# pinned llama-cpp-python sdist vendors, with this repository's patches to it
# (scripts/llama-server-*.patch, each says why), and puts into OUT_DIR only what
# is the server's own: llama-server, libllama-server-impl.so, libllama-common.so.
# llama.cpp's libraries (libllama, libggml*, libmtmd) are not copied: at run time
# LD_LIBRARY_PATH names a CPU level folder (scripts/cpu-levels.sh) or the wheel's
# lib folder, built from the same sources, so both engines load the same llama.cpp
# for the same CPU. RUNPATH is $ORIGIN for the server's own libraries.
#
# usage: build-llama-server.sh LLAMA_CPP_SOURCE OUT_DIR   (the source is patched in place)
set -eu
src=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
for patch in "$here"/llama-server-*.patch; do
    patch -d "$src" -p1 --forward --batch < "$patch" >/dev/null
done
build=$(mktemp -d)
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' >/dev/null
cmake --build "$build" --target llama-server -j"$(nproc)" >/dev/null
mkdir -p "$out"
cp -a "$build"/bin/llama-server "$build"/bin/libllama-server-impl.so "$build"/bin/libllama-common.so* "$out/"
rm -rf "$build"
echo "build-llama-server.sh: built $out/llama-server"
