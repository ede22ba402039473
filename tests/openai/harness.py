"""Starts the real agentd binary (real SQLite file, port 0) in front of the mock upstream binary
(agentd-mock-upstream from crates/agentd-testkit, over real HTTP), for the OpenAI SDK tests.

Binaries: $AGENTD_BIN and $AGENTD_MOCK_BIN, else $CARGO_TARGET_DIR/debug/{agentd,agentd-mock-upstream}
(CARGO_TARGET_DIR defaults to ~/.cache/agentd-target, as scripts/test.sh sets it).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

KEY = "sk-alice-oai"

CONFIG = """
[server]
listen = "127.0.0.1:0"
workspace_dir = "{dir}/workspaces"
shutdown_grace_s = 1
ask_human_timeout_s = 20
{server_extra}

[store]
url = "sqlite://{dir}/agentd.db"

[[auth.keys]]
principal = "alice"
key = "{key}"

[providers.upstream]
kind = "openai"
base_url = "{upstream}"
timeout_s = 30

[[agents]]
name = "assistant"
description = "General helper"
provider = "upstream"
model = "mock-model"
system_prompt = "You are a helpful assistant."
tools = ["calculator", "current_time", "ask_human"]

[[agents]]
name = "bare"
description = "No tools of its own"
provider = "upstream"
model = "mock-model"

[[agents]]
name = "careful"
description = "Calculates once a person allows it"
provider = "upstream"
model = "mock-model"
tools = ["calculator"]
approve = ["calculator"]
"""


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/agentd-target")


def binary(env, name):
    path = os.environ.get(env) or os.path.join(target_dir(), "debug", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found at {path}: build the workspace's tests (cargo test --workspace --no-run) or set {env}")
    return path


class Output:
    """A process's output, collected by a thread; `wait_for` a regex in it."""

    def __init__(self, stream):
        self.text = ""
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in iter(stream.readline, ""):
            with self.cond:
                self.text += line
                self.cond.notify_all()

    def wait_for(self, pattern, timeout=30):
        deadline = time.time() + timeout
        with self.cond:
            while True:
                m = re.search(pattern, self.text)
                if m:
                    return m
                left = deadline - time.time()
                if left <= 0:
                    raise RuntimeError(f"did not see {pattern!r} within {timeout} s:\n{self.text}")
                self.cond.wait(left)


class Mock:
    def __init__(self):
        self.proc = subprocess.Popen([binary("AGENTD_MOCK_BIN", "agentd-mock-upstream")], stdout=subprocess.PIPE, text=True)
        self.out = Output(self.proc.stdout)
        self.base_url = self.out.wait_for(r"listening on (\S+)").group(1)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


class Agentd:
    """A real agentd process on a directory of its own (kept across restarts)."""

    def __init__(self, upstream, server_extra=""):
        self.dir = tempfile.mkdtemp(prefix="agentd-oai-")
        self.config = os.path.join(self.dir, "agentd.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(dir=self.dir, key=KEY, upstream=upstream, server_extra=server_extra))
        self.proc = None
        self.url = None

    def start(self):
        self.proc = subprocess.Popen(
            [binary("AGENTD_BIN", "agentd"), "serve", "--config", self.config],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.out = Output(self.proc.stdout)
        self.url = self.out.wait_for(r"agentd listening on (http://[0-9.]+:\d+)").group(1)
        return self

    def stop(self):
        """SIGTERM, as an operator stops it; waits for the exit."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.proc.stdout.close()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def native(self, method, path, body=None):
        """A call of the native REST API (the sessions the OpenAI surfaces create are visible there)."""
        req = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
