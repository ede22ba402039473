#!/usr/bin/env bash
# The OpenAI SDK tests: the official `openai` Python package (pinned in requirements.txt, in a venv of its own,
# made by scripts/setup.sh test) against the real agentd binary and the mock upstream binary, both from the
# workspace's test build ($CARGO_TARGET_DIR/debug). Arguments go to unittest (e.g. a test's name).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/agentd-target}"
cmp -s requirements.txt .venv/requirements.txt || ../../scripts/setup.sh openai
exec .venv/bin/python -m unittest -v "${@:-test_openai_sdk}"
