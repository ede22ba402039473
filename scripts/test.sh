#!/usr/bin/env bash
# The whole test suite, as CI runs it: format, lints, every crate's tests (with the real default model),
# the browser end-to-end tests, and a smoke run of the benchmark harness.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTD_SETUP_BROWSER=1 ./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/agentd-target}"
# setup.sh fetched the default model: tests that need it must run, never skip.
export AGENTD_REQUIRE_MODEL=1

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== tests"
cargo test --workspace
if [[ -x scripts/e2e.sh ]]; then
    echo "== browser end-to-end"
    ./scripts/e2e.sh
fi
if [[ -x scripts/bench.sh ]]; then
    echo "== benchmark harness smoke run"
    ./scripts/bench.sh --quick
fi
echo "== all passed"
