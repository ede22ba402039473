#!/usr/bin/env bash
# The chaos run (issue 15): the soak (scripts/soak.sh, crates/agentd-bench/src/soak.rs) against several agentd
# nodes on one PostgreSQL database (SPEC.md section 6). Every client connection and REST call goes to a node
# chosen at random (a reconnect goes to another node); every --kill-every seconds a random node gets kill -9
# and is started again (same node id, port and database) after a pause of 1 s to 2 x lease_s (at most half
# the kill period), so its runs are taken back either by itself at start or by another node once its lease
# lapses. Checked at the end: every client's stream equals the log, every run has exactly one run_finished,
# every run_resumed answers a kill of the node that executed the run (takeover times: kill -> first client
# receipt, p50/p99/max against lease_s), and each node's heap for growth. Exit status 0 only if all held.
#
#   scripts/chaos.sh                                          # 3 nodes, 600 s, 200 sessions, a kill every 30 s
#   scripts/chaos.sh --duration 60 --kill-every 20 --sessions 50   # a short one
#   scripts/chaos.sh --debug                                  # against the debug build the tests use
#
# Release binaries by default (three nodes, the clients and PostgreSQL share the machine). The database is
# AGENTD_BENCH_PG (default postgres://postgres@127.0.0.1:5432), a fresh one per run, dropped when the run
# passes. Any other `agentd-bench soak` option passes through and wins over the defaults below (`--help`
# lists them). A ten-minute run writes bench-results/chaos/{soak.md,soak.json,rss.csv,rss.png}; shorter ones
# write bench-results/tmp/chaos/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

profile=release
pass=()
for arg in "$@"; do
    case "$arg" in
        --debug) profile=debug ;;
        --release) profile=release ;;
        *) pass+=("$arg") ;;
    esac
done

# Hundreds of WebSockets on each side, plus SSE streams and three nodes' database connections.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$profile" = release ]; then
    cargo build --release -p agentd -p agentd-bench
else
    # As scripts/soak.sh: the binaries `cargo test --workspace` builds.
    cargo test --workspace --no-run --quiet
fi

# The chaos defaults, each unless the caller gave that option.
defaults=()
for kv in nodes=3 kill-every=30 duration=600 lease-s=10 sessions=200; do
    name="--${kv%%=*}"
    given=no
    for arg in ${pass[@]+"${pass[@]}"}; do
        if [ "$arg" = "$name" ] || [[ "$arg" == "$name="* ]]; then
            given=yes
        fi
    done
    if [ "$given" = no ]; then
        defaults+=("$name" "${kv#*=}")
    fi
done

export AGENTD_SOAK_COMMAND="scripts/chaos.sh${*:+ $*}"
exec "$CARGO_TARGET_DIR/$profile/agentd-bench" soak --repo "$ROOT" \
    --agentd-bin "$CARGO_TARGET_DIR/$profile/agentd" \
    ${defaults[@]+"${defaults[@]}"} ${pass[@]+"${pass[@]}"}
