#!/usr/bin/env bash
# Tests of the web chat page: its unit tests (web/test/: the view model and connection logic on recorded
# frames, the vendored libraries), then the browser end-to-end tests (web/e2e/): the real agentd binary against
# a mock upstream, driven in Debian's headless Chromium through playwright-core. Installs what is missing
# (chromium, node, the npm packages), builds the binary, runs the tests; exits non-zero when a test fails.
# Screenshots and server logs: web/test-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"

sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo="sudo"; fi

apt_install() {
  # A fresh machine may have no package lists yet: update once and retry.
  $sudo apt-get install -y --no-install-recommends "$@" || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "$@"; }
}

if [ ! -x /usr/bin/chromium ]; then
  echo "e2e: installing chromium" >&2
  apt_install chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "e2e: installing node and npm" >&2
  apt_install nodejs npm
fi
if [ ! -d web/node_modules/playwright-core ] || [ ! -d web/node_modules/marked ]; then
  echo "e2e: installing npm packages" >&2
  (cd web && npm ci --no-audit --no-fund)
fi

echo "e2e: unit tests of the page (web/test/)" >&2
(cd web && node --test --test-reporter=spec test/)

echo "e2e: building agentd" >&2
# The binary the workspace's tests build (scripts/test.sh has just built it, so this is a no-op there).
# `cargo build -p agentd` would resolve features differently and compile llama.cpp once more on a cold machine.
cargo test --workspace --no-run --quiet
export AGENTD_BIN="${AGENTD_BIN:-$CARGO_TARGET_DIR/debug/agentd}"

rm -rf web/test-results
mkdir -p web/test-results
echo "e2e: running the browser tests against $AGENTD_BIN" >&2
status=0
(cd web && node --test --test-concurrency=1 --test-reporter=spec e2e/chat.test.mjs e2e/issue16.test.mjs e2e/approval.test.mjs) || status=$?
echo "e2e: screenshots and logs in web/test-results/" >&2
exit "$status"
