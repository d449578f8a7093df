#!/bin/sh
# Builds target/reference/reference: llama.cpp from the crates.io package llama-cpp-sys-2 (the
# version vendor/ggml/VERSION names), with cmake, and scripts/reference/reference.cpp against it.
# ggml is built without OpenMP, like ours, so both run the same thread pool.
set -eu
VERSION=0.1.161
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/target/reference
mkdir -p "$OUT"
# The tree an earlier build was configured with, while it exists: another tree (cargo may unpack
# the package later) would make cmake rebuild everything.
SRC=$(sed -n 's|^LLAMA_CPP_DIR:[A-Z]*=\(.*\)/llama.cpp$|\1|p' "$OUT/build/CMakeCache.txt" 2>/dev/null || true)
case "$SRC" in *-$VERSION) [ -d "$SRC/llama.cpp" ] || SRC= ;; *) SRC= ;; esac
[ -n "$SRC" ] || SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-$VERSION 2>/dev/null | head -1 || true)
if [ -z "$SRC" ]; then
    CRATE=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/llama-cpp-sys-2-$VERSION.crate 2>/dev/null | head -1 || true)
    if [ -z "$CRATE" ]; then
        # Ask cargo to fetch the package into its cache, through a throwaway manifest.
        mkdir -p "$OUT/fetch/src"
        printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nllama-cpp-sys-2 = "=%s"\n' "$VERSION" > "$OUT/fetch/Cargo.toml"
        echo 'fn main() {}' > "$OUT/fetch/src/main.rs"
        (cd "$OUT/fetch" && cargo fetch -q)
        CRATE=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/llama-cpp-sys-2-$VERSION.crate | head -1)
    fi
    tar -xzf "$CRATE" -C "$OUT"
    SRC=$OUT/llama-cpp-sys-2-$VERSION
fi
cmake -S "$ROOT/scripts/reference" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CPP_DIR="$SRC/llama.cpp" -DGGML_NATIVE=ON > "$OUT/cmake.log"
cmake --build "$OUT/build" --target reference -j "$(nproc)" > "$OUT/build.log"
# Copied then renamed: a reference program still running keeps its old file.
cp "$OUT/build/reference" "$OUT/reference.tmp"
mv "$OUT/reference.tmp" "$OUT/reference"
echo "built $OUT/reference"
