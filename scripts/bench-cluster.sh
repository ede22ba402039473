#!/usr/bin/env bash
# The two-node benchmark (issue #15): two agentd nodes on one fresh PostgreSQL database (of the server
# AGENTD_BENCH_PG names, default postgres://postgres@127.0.0.1:5432), one mock upstream. Measures the added
# latency of a subscriber on the other node than the run against one on the same node (200 streams x 20
# tokens/s), and tokens/s and CPU per 1,000 tokens (both agentd processes + PostgreSQL's CPU) of two nodes
# against one. Writes bench-results/cluster/{cluster.md,cluster.json}. See crates/agentd-bench/src/cluster.rs.
#
#   scripts/bench-cluster.sh                      # three runs (about 3-5 minutes on 2 cores, once built)
#   scripts/bench-cluster.sh --runs 5             # any `agentd-bench cluster` option passes through
#   scripts/bench-cluster.sh --subscribers split  # one subscriber per session, half on each node
#   scripts/bench-cluster.sh --quick              # smoke run (one run, small sizes; writes bench-results/tmp/cluster)
#
# Needs: cargo, taskset (util-linux), a reachable PostgreSQL 15+ whose user may create databases.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# 200 sessions with a WebSocket on each node, and 1,000 at the largest throughput level, need more
# descriptors than a soft limit of 1024 leaves.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release -p agentd -p agentd-bench

extra=()
case " $* " in *" --agentd-bin "*) ;; *) extra+=(--agentd-bin "$CARGO_TARGET_DIR/release/agentd") ;; esac

export AGENTD_BENCH_COMMAND="scripts/bench-cluster.sh${*:+ $*}"
exec "$CARGO_TARGET_DIR/release/agentd-bench" cluster --repo "$ROOT" "${extra[@]}" "$@"
