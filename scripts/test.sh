#!/usr/bin/env bash
# The whole test suite, as CI runs it: format, lints, every crate's tests (with the real default model),
# the browser end-to-end tests, and a smoke run of the benchmark harness.
#
# On a cold machine most of the time is compiling (llama.cpp above all), so what needs only the network or
# apt (the model, chromium, promtool, npm packages) is fetched in the background meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/agentd-target}"
started=$SECONDS
step() { echo "== $1 ($((SECONDS - started)) s)"; }

step "setup"
./scripts/setup.sh build
setup_log="$(mktemp)"
./scripts/setup.sh model test >"$setup_log" 2>&1 &
setup_pid=$!
trap 'kill "$setup_pid" 2>/dev/null || true; rm -f "$setup_log"' EXIT

step "fmt"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "build tests"
cargo test --workspace --no-run --quiet
if ! wait "$setup_pid"; then
    cat "$setup_log" >&2
    echo "setup (model, test packages) failed" >&2
    exit 1
fi
cat "$setup_log"

# The fuzz smoke run builds in a target dir of its own (instrumented), so it goes on beside the tests, which
# wait on sockets more than they compute.
fuzz_log="$(mktemp)"
FUZZ_TARGET_DIR="$CARGO_TARGET_DIR/fuzz" ./scripts/fuzz.sh 5 >"$fuzz_log" 2>&1 &
fuzz_pid=$!
trap 'kill "$setup_pid" "$fuzz_pid" 2>/dev/null || true; rm -f "$setup_log" "$fuzz_log"' EXIT

# setup.sh fetched the default model and started PostgreSQL: tests that need them must run, never skip.
export AGENTD_REQUIRE_MODEL=1 AGENTD_REQUIRE_PG=1
step "tests"
cargo test --workspace
step "server suites on Postgres"
# The whole workspace's test targets again (the server's suites are crates/agentd's; the others ignore the
# variable): `-p agentd` alone would resolve features apart and compile twenty crates again.
AGENTD_TEST_STORE=postgres cargo test --workspace --tests
step "fuzz smoke run (each target a few seconds; started with the tests)"
fuzz_status=0
wait "$fuzz_pid" || fuzz_status=$?
cat "$fuzz_log"
if (( fuzz_status != 0 )); then
    echo "fuzz smoke run failed" >&2
    exit 1
fi
step "browser end-to-end"
./scripts/e2e.sh
step "benchmark harness smoke run"
./scripts/bench.sh --quick
step "soak (30 s)"
./scripts/soak.sh --duration 30 --sessions 100 --kill-every 10
step "all passed"
