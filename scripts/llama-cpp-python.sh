#!/bin/sh
# The pinned llama-cpp-python, checked before anything of it is built, for the image, the
# tests and the benchmarks alike:
#   DEST/llama_cpp_python-VERSION.tar.gz  the sdist from PyPI; pip checks its SHA-256 against
#                                         the one pinned in requirements/image.txt
#   DEST/wheels/                          its Python code as a wheel (LLAMA_BUILD=OFF: llama.cpp
#                                         is built by build-llama-cpp.sh), by the build backend
#                                         pinned with hashes in requirements/build.txt
#   DEST/llama_cpp_python-VERSION/        the unpacked sources: vendor/llama.cpp is what
#                                         build-llama-cpp.sh builds
# usage: llama-cpp-python.sh REQUIREMENTS_DIR DEST
set -eu
requirements=$1 dest=$2
# The requirement line and its hashes, as the lock writes them ("NAME==V \" then "--hash=..." lines).
pinned=$(awk '/^llama-cpp-python==/ {p = 1; printf "%s", $1; next}
              p && /--hash=/ {printf " %s", $1; next}
              p {exit}' "$requirements/image.txt")
case "$pinned" in
    *--hash=sha256:*) ;;
    *) echo "llama-cpp-python.sh: no pinned llama-cpp-python with a hash in $requirements/image.txt" >&2; exit 1 ;;
esac
mkdir -p "$dest"
echo "$pinned" > "$dest/requirement.txt"
build=$(mktemp -d)
python3 -m venv "$build"
"$build/bin/pip" install --quiet --require-hashes --no-deps -r "$requirements/build.txt"
# No build isolation here either: pip reads the sdist's metadata with the pinned backend above,
# instead of fetching (and, with no binaries allowed, compiling) an unpinned one.
"$build/bin/pip" download --quiet --require-hashes --no-deps --no-build-isolation --no-binary llama-cpp-python \
    -d "$dest" -r "$dest/requirement.txt"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$build/bin/pip" wheel --quiet --no-build-isolation --no-deps \
    -w "$dest/wheels" "$dest"/llama_cpp_python-*.tar.gz
tar -xzf "$dest"/llama_cpp_python-*.tar.gz -C "$dest"
rm -rf "$build"
echo "llama-cpp-python.sh: ${pinned%% *} checked and built in $dest"
