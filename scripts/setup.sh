#!/usr/bin/env bash
# Installs what building and running agentd needs on a fresh Debian machine, and only what is missing:
# cmake + libclang-dev (to build llama.cpp), libgomp1 (its OpenMP runtime), unzip (model fetch), and the
# default model file; with AGENTD_SETUP_POSTGRES=1 also PostgreSQL (installed, started, trusted on 127.0.0.1).
# Called by scripts/run.sh and scripts/test.sh; safe to run again.
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
fi
# The Postgres store's tests (and the server suite on Postgres) need a PostgreSQL server on 127.0.0.1:5432.
if [[ "${AGENTD_SETUP_POSTGRES:-0}" == 1 ]]; then
    command -v pg_ctlcluster >/dev/null || need+=(postgresql)
fi
if (( ${#need[@]} )); then
    echo "setup: installing ${need[*]} (apt)"
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }

# PostgreSQL for the tests: a cluster listening on 127.0.0.1:5432 that lets user `postgres` in over local TCP
# without a password, as on the project's machines. Debian's pg_hba.conf asks TCP clients for a password
# (scram-sha-256), so a `trust` rule for user postgres from the loopback addresses goes first in it; nothing
# else of the cluster's configuration changes. Started when nothing listens on 5432.
if [[ "${AGENTD_SETUP_POSTGRES:-0}" == 1 ]]; then
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    pg_version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [[ -z "$pg_version" || ! -f /etc/postgresql/$pg_version/main/pg_hba.conf ]]; then
        echo "setup: no PostgreSQL cluster found under /etc/postgresql" >&2
        exit 1
    fi
    hba=/etc/postgresql/$pg_version/main/pg_hba.conf
    changed=0
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
fi

./scripts/fetch-model.sh models
