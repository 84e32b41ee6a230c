#!/usr/bin/env bash
# llama.cpp's own binaries (llama-server, llama-bench, llama-perplexity) from the source that
# llama-cpp-python 0.3.36 vendors (the same llama.cpp that `make bench-llamacpp` installs), built
# with the Makefile's flags: AVX2 + AVX-512 (VNNI, VBMI, BF16), no AMX (ggml's AMX path
# segfaults in these VMs), no native tuning, static libraries (no network, no UI download).
#
#   benchmarks/llamacpp_build.sh          # builds once (~10 min on 2 cores), then prints the bin folder
#   LLAMACPP_DIR=... LLAMACPP_CMAKE="..." LLAMACPP_JOBS=2 benchmarks/llamacpp_build.sh
#
# Idempotent: when the three binaries exist and were built from this version with these flags,
# it only prints the bin folder (the last line of stdout; benchmarks read it). Build output goes
# to $LLAMACPP_DIR/build.log. The build runs under `nice -n 10`.
set -euo pipefail

VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
DIR="${LLAMACPP_DIR:-$HOME/.cache/tp_engine/llamacpp-build}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
# Keep in step with LLAMACPP_CMAKE in the Makefile (the llama-cpp-python build).
FLAGS="${LLAMACPP_CMAKE:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"
EXTRA="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF"
TARGETS="llama-server llama-bench llama-perplexity"
JOBS="${LLAMACPP_JOBS:-$(nproc)}"
BIN="$DIR/bin"
STAMP="$BIN/.built"
WANT="llama-cpp-python $VERSION | $FLAGS | $EXTRA"

built() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] || return 1
    for t in $TARGETS; do [ -x "$BIN/$t" ] || return 1; done
}

if built; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9  # two benchmarks starting together: one builds, the other waits and reuses it
if built; then
    echo "$BIN"
    exit 0
fi

SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    TAR="$DIR/llama_cpp_python-$VERSION.tar.gz"
    if [ ! -f "$TAR" ]; then
        echo "llamacpp_build: downloading the llama-cpp-python $VERSION sdist" >&2
        "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR" >&2
    fi
    tar -xzf "$TAR" -C "$DIR"
fi

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
echo "llamacpp_build: building $TARGETS in $DIR/build ($JOBS jobs, log $DIR/build.log)" >&2
# shellcheck disable=SC2086  # FLAGS and EXTRA are lists of -D options
{
    nice -n 10 cmake -S "$SRC" -B "$DIR/build" "${GEN[@]}" $FLAGS $EXTRA
    # shellcheck disable=SC2086
    nice -n 10 cmake --build "$DIR/build" --target $TARGETS -j "$JOBS"
} >"$DIR/build.log" 2>&1 || { tail -40 "$DIR/build.log" >&2; exit 1; }

mkdir -p "$BIN"
for t in $TARGETS; do
    cp "$DIR/build/bin/$t" "$BIN/$t"
done
echo "$WANT" >"$STAMP"
echo "llamacpp_build: built $(for t in $TARGETS; do printf '%s ' "$BIN/$t"; done)" >&2
echo "$BIN"
