#!/usr/bin/env bash
# Runs the benchmark harness (crates/agentd-bench): agentd (on SQLite, and on a fresh PostgreSQL database of
# the server AGENTD_BENCH_PG names, default postgres://postgres@127.0.0.1:5432) against the Python peer and
# the floor relay, all on one mock upstream. Writes bench-results/{results.md,results.json,plot.png} and, for a full run,
# the results section of BENCHMARKS.md. See BENCHMARKS.md for what is measured and how.
#
#   scripts/bench.sh                 # full run (about 5-10 minutes on 2 cores)
#   scripts/bench.sh --quick         # CI-sized smoke run (under a minute once built; writes bench-results/tmp/)
#   scripts/bench.sh --servers peer,floor --no-doc     # any `agentd-bench run` option passes through
#   scripts/bench.sh --servers agentd --scenarios throughput,latency --scrape-metrics --no-doc
#                                    # CPU per token with GET /metrics scraped every second vs. not at all
#
# Needs: cargo, python3 (with venv) for the peer, taskset (util-linux), and ../shared/bench beside the repo
# (or --bench-dir DIR).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

profile=release
for arg in "$@"; do
    if [ "$arg" = "--quick" ]; then
        profile=debug # CI has built the dev profile already; quick figures mean nothing anyway
    fi
done

# Ten thousand idle connections need more descriptors than the usual soft limit of 1024.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
extra=()
if [ "$profile" = release ]; then
    cargo build --release -p agentd-bench
else
    # The smoke run uses the binaries `cargo test --workspace` built (a no-op after scripts/test.sh's tests):
    # `cargo build -p agentd-bench` / `-p agentd` resolve features apart from the test build and would compile
    # some forty crates again on a cold machine. It runs agentd alone unless --servers says otherwise: the
    # floor's release build and the peer's venv are minutes on a cold machine and prove nothing in a smoke run.
    # agentd on Postgres runs too (a column that says "not run" when no Postgres is reachable).
    cargo test --workspace --no-run --quiet
    case " $* " in *" --agentd-bin "*) ;; *) extra+=(--agentd-bin "$CARGO_TARGET_DIR/debug/agentd") ;; esac
    case " $* " in *" --servers "*) ;; *) extra+=(--servers agentd,agentd-pg) ;; esac
fi

export AGENTD_BENCH_COMMAND="scripts/bench.sh${*:+ $*}"
exec "$CARGO_TARGET_DIR/$profile/agentd-bench" run --repo "$ROOT" "${extra[@]}" "$@"
