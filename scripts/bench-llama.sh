#!/usr/bin/env bash
# Reference speed of the default local model: builds llama.cpp's own `llama-bench` and runs it on the model
# (and builds `llama-server`, which `agentd-bench llama --concurrent N` runs as the anchor for concurrent turns,
# and `llama-tokenize`).
#
# The llama.cpp source comes from the `llama-cpp-python` sdist on PyPI (it vendors llama.cpp), because PyPI is
# reachable where GitHub may not be. Everything is built in a cache directory outside the repository, so no
# build output lands in the checkout; a second run reuses the build.
#
# Usage: scripts/bench-llama.sh [MODEL]        (default: models/SmolLM2-135M-Instruct.Q4_1.gguf)
# Env:   BENCH_CACHE   cache dir              (default: ~/.cache/agentd-llama-bench)
#        BENCH_THREADS threads for llama-bench (default: 2)
#        BENCH_NATIVE  GGML_NATIVE for the build, ON or OFF (default: OFF, the same instruction set llama-cpp-2
#                      compiles by default: GGML_NATIVE=OFF with ggml's AVX/AVX2/FMA/F16C defaults; ON adds
#                      whatever the build machine has, e.g. AVX-512)
#        LLAMA_CPP_PYTHON_VERSION  pin the sdist (default: latest)
set -euo pipefail

MODEL="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
CACHE="${BENCH_CACHE:-$HOME/.cache/agentd-llama-bench}"
THREADS="${BENCH_THREADS:-2}"
NATIVE="${BENCH_NATIVE:-OFF}"
SPEC="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"

die() { echo "bench-llama: $*" >&2; exit 1; }
[[ -f "$MODEL" ]] || die "model $MODEL not found (run scripts/fetch-model.sh)"
for tool in python3 cmake c++ tar; do command -v "$tool" >/dev/null || die "$tool is required"; done
MODEL="$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")"

mkdir -p "$CACHE/sdist"
sdist="$(find "$CACHE/sdist" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | sort -V | tail -n1)"
if [[ -z "$sdist" || -n "${LLAMA_CPP_PYTHON_VERSION:-}" && "$sdist" != *"-${LLAMA_CPP_PYTHON_VERSION}.tar.gz" ]]; then
    echo "downloading the $SPEC sdist from PyPI ..."
    python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$CACHE/sdist" "$SPEC" \
        || die "pip download $SPEC failed"
    sdist="$(find "$CACHE/sdist" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | sort -V | tail -n1)"
fi
[[ -n "$sdist" ]] || die "no llama-cpp-python sdist in $CACHE/sdist"
name="$(basename "$sdist" .tar.gz)"
src="$CACHE/$name/vendor/llama.cpp"
[[ -d "$src" ]] || tar xzf "$sdist" -C "$CACHE"
[[ -f "$src/CMakeLists.txt" ]] || die "$sdist has no vendor/llama.cpp"

build="$CACHE/build-$name-native-$NATIVE"
bench="$build/bin/llama-bench"
# llama-tokenize too: agentd-bench counts its prompts' tokens with it, to run llama-bench at the same depth.
# llama-server: agentd-bench's concurrent mode runs it (`--parallel N`) beside agentd's N concurrent turns.
if [[ ! -x "$bench" || ! -x "$build/bin/llama-tokenize" || ! -x "$build/bin/llama-server" ]]; then
    echo "building llama-bench, llama-tokenize and llama-server from $name (GGML_NATIVE=$NATIVE) in $build ..."
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE="$NATIVE" -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON >"$build.log" 2>&1 \
        || die "cmake configure failed, see $build.log"
    cmake --build "$build" --target llama-bench llama-tokenize llama-server -j "$(nproc)" >>"$build.log" 2>&1 \
        || die "build failed, see $build.log"
fi

ggml_version() {
    sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$1/ggml/CMakeLists.txt" | paste -sd.
}
# The llama-cpp-sys-2 version Cargo.lock pins (run from the repository root), and its source in cargo's cache.
sys_version="$(awk '/^name = "llama-cpp-sys-2"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock 2>/dev/null || true)"
sys_src=""
if [[ -n "$sys_version" ]]; then
    sys_src="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name "llama-cpp-sys-2-$sys_version" \
        2>/dev/null | head -n1)"
fi

echo
echo "llama.cpp for llama-bench: vendored in $name, ggml $(ggml_version "$src")"
if [[ -n "$sys_src" ]]; then
    echo "llama.cpp in llama-cpp-2:  vendored in $(basename "$sys_src"), ggml $(ggml_version "$sys_src/llama.cpp")"
fi
echo "model: $MODEL"
echo
# pp200 and tg128 from an empty context, and again at depth 160 (a 160-token prompt already in the cache),
# which is what the agentd run below does: its generation starts after its prompt.
"$bench" -m "$MODEL" -t "$THREADS" -p 200 -n 128 -d 0,160 -r 3 -o md 2>/dev/null

# The same model through agentd's provider (llama-cpp-2), on a similar workload: a ~200-token prompt, then 128
# generated tokens. Prompt speed here includes tokenizing and the first sampled token, so it reads a bit low.
if [[ -f Cargo.toml && -d crates/agentd-llama ]]; then
    echo
    echo "agentd-llama (llama-cpp-2), 3 runs:"
    cargo build -q -p agentd-llama --example generate
    prompt="Summarise this text. $(printf 'The lighthouse keeper climbed the stairs every evening to light the lamp. %.0s' {1..11})"
    for _ in 1 2 3; do
        AGENTD_MODEL="$MODEL" cargo run -q -p agentd-llama --example generate -- \
            --greedy --ignore-eos --max 128 --threads "$THREADS" "$prompt" 2>&1 >/dev/null | tail -n1
    done
fi
