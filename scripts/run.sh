#!/usr/bin/env bash
# Runs agentd. With no arguments: the built-in default (the embedded local model, SQLite under ./data,
# http://127.0.0.1:8080). Any arguments go to `agentd serve`, e.g. `--config agentd.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/agentd-target}"
cargo build --release -p agentd
exec "$CARGO_TARGET_DIR/release/agentd" serve "$@"
