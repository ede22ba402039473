#!/usr/bin/env bash
# Installs what building and running agentd needs on a fresh Debian machine, and only what is missing:
# cmake + libclang-dev (to build llama.cpp), libgomp1 (its OpenMP runtime), unzip (model fetch), and the
# default model file. Called by scripts/run.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v unzip >/dev/null || need+=(unzip)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
dpkg -s libgomp1 >/dev/null 2>&1 || need+=(libgomp1)
if [[ "${AGENTD_SETUP_BROWSER:-0}" == 1 ]]; then
    [[ -x /usr/bin/chromium ]] || need+=(chromium)
    command -v npm >/dev/null || need+=(npm)
    # promtool, for the metrics test's `promtool check metrics` (crates/agentd/tests/metrics.rs).
    command -v promtool >/dev/null || need+=(prometheus)
fi
if (( ${#need[@]} )); then
    echo "setup: installing ${need[*]} (apt)"
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }

./scripts/fetch-model.sh models
