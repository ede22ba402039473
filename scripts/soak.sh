#!/usr/bin/env bash
# The soak (crates/agentd-bench/src/soak.rs; BENCHMARKS.md, "Soak"): sessions with clients that drop and come
# back with `after`, cancels and `ask_human` answers, against the real agentd binary and the mock upstream,
# with a kill -9 + restart of the server every period. Then every client's stream is compared with each
# session's log read afresh, every run is checked for exactly one run_finished, and the server's RSS (sampled
# every second) for growth. Exit status 0 only if all of that held.
#
#   scripts/soak.sh                                              # full: 600 s, 1,000 sessions, kill every 60 s
#   scripts/soak.sh --duration 30 --sessions 100 --kill-every 10 # the test command's short version
#   scripts/soak.sh --release                                    # against a release build of agentd
#
# Any other `agentd-bench soak` option passes through (`--help` lists them). A full-size run writes
# bench-results/soak/{soak.md,soak.json,rss.csv,rss.png}; smaller ones write bench-results/tmp/soak/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

profile=debug
for arg in "$@"; do
    if [ "$arg" = "--release" ]; then
        profile=release
    fi
done

# A thousand WebSockets on each side, plus SSE streams and the database.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$profile" = release ]; then
    cargo build --release -p agentd -p agentd-bench
else
    # The agentd the workspace's tests build (as scripts/e2e.sh does): `cargo build -p agentd` would resolve
    # features differently and compile llama.cpp once more. After `cargo test --workspace` this is instant.
    # agentd-bench too: `cargo build -p agentd-bench` would compile some forty crates again.
    cargo test --workspace --no-run --quiet
fi

export AGENTD_SOAK_COMMAND="scripts/soak.sh${*:+ $*}"
exec "$CARGO_TARGET_DIR/$profile/agentd-bench" soak --repo "$ROOT" \
    --agentd-bin "$CARGO_TARGET_DIR/$profile/agentd" "$@"
