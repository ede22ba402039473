#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/corpus/TARGET/seed-*: real client frames of the three
WebSocket surfaces (as the tests in crates/agentd/tests send them), real config files (the built-in default,
the README's examples, the tests'), real upstream streams (as crates/agentd-testkit's mock writes them, and as
OpenAI / vLLM / llama.cpp servers do), real tail segment files (records as tail.rs encodes them) and upload
names. Run from the repository root; `cargo fuzz cmin` then keeps what adds coverage."""
import json
import os
import struct
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def frames():
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    native = {
        "ping": {"type": "ping"},
        "message": {"type": "message", "content": "calc: 6*7"},
        "message-full": {"type": "message", "content": "again tokens=1", "images": [png],
                          "files": ["4f1c2a"], "client_message_id": "c-1", "multitask": "interrupt"},
        "message-enqueue": {"type": "message", "content": "x", "multitask": "enqueue", "images": None},
        "message-bad-multitask": {"type": "message", "content": "x", "multitask": "later"},
        "message-bad-images": {"type": "message", "content": "x", "images": "no"},
        "message-no-content": {"type": "message"},
        "cancel": {"type": "cancel"},
        "cancel-run": {"type": "cancel", "run_id": "0b0e6f0c"},
        "reply": {"type": "reply", "request_id": "req-1", "content": "Ada"},
        "reply-missing": {"type": "reply", "request_id": "req-1"},
        "unknown": {"type": "subscribe"},
        "no-type": {"content": "hi"},
    }
    for name, v in native.items():
        write("native_frame", name, json.dumps(v))
    write("native_frame", "not-json", "{oops")
    write("native_frame", "array", "[1,2,3]")
    write("native_frame", "unicode", json.dumps({"type": "message", "content": "h\u00e9llo \u2603 \U0001F600"}, ensure_ascii=False))

    kit = {
        "message": {"type": "message", "content": "greet me"},
        "message-null": {"type": "message", "content": None},
        "message-number": {"type": "message", "content": 5},
        "reply": {"type": "reply", "request_id": "req-1", "content": "Ada"},
        "reply-object": {"type": "reply", "request_id": "req-1", "content": {"a": [1, 2]}},
        "reply-nobody": {"type": "reply", "content": "x"},
        "cancel": {"type": "cancel"},
        "ping": {"type": "ping"},
        "unknown": {"type": "hello"},
    }
    for name, v in kit.items():
        write("agentkit_frame", name, json.dumps(v))
    write("agentkit_frame", "not-json", "ping")

    navi = {
        "message": {"type": "message", "content": "hello?"},
        "message-images": {"type": "message", "content": "look", "images": ["data:image/png;base64," + png, png]},
        "message-files": {"type": "message", "content": "read these",
                          "files": [{"name": "a.txt", "path": "/up/a.txt"}, {"name": "b", "path": "b"}]},
        "empty": {"type": "message", "content": ""},
        "bad-files": {"type": "message", "content": "bad", "files": [{"name": "x"}]},
        "bad-images": {"type": "message", "content": "bad", "images": [1]},
        "falsy": {"type": "message", "content": "x", "images": 0, "files": False},
        "ping": {"type": "ping"},
    }
    for name, v in navi.items():
        write("navi_frame", name, json.dumps(v))
    write("navi_frame", "not-json", "hello")


def configs():
    default = '''
[server]
listen = "127.0.0.1:8080"

[store]
url = "sqlite://data/agentd.db"

[providers.local]
kind = "llama"
model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
context_tokens = 4096
threads = 2

[[agents]]
name = "assistant"
description = "General helper on the embedded local model"
provider = "local"
model = "SmolLM2-135M-Instruct"
system_prompt = "You are a helpful assistant. Answer briefly."
tools = ["calculator", "current_time", "ask_human"]
'''
    full = '''
[server]
listen = "0.0.0.0:8080"
max_message_bytes = 262144
max_upload_bytes = 20971520
max_image_bytes = 5242880
shutdown_grace_s = 10
ask_human_timeout_s = 600
workspace_dir = "data/workspaces"
max_subagent_depth = 3
event_retention_runs = 20

[store]
url = "sqlite:///var/lib/agentd/agentd.db"

[[auth.keys]]
principal = "alice"
key_env = "AGENTD_KEY_ALICE"

[[auth.keys]]
principal = "ops"
key = "ops-secret"
admin = true

[providers.upstream]
kind = "openai"
base_url = "http://127.0.0.1:9000/v1/"
api_key_env = "OPENAI_API_KEY"
timeout_s = 120
context_tokens = 32768

[providers.local]
kind = "llama"
model_path = "models/m.gguf"

[[agents]]
name = "assistant"
description = "General helper"
provider = "upstream"
model = "gpt-4o-mini"
system_prompt = """You are helpful.
Answer briefly."""
tools = ["calculator", "current_time", "ask_human", "read_file", "list_files"]
max_iterations = 8
max_context_tokens = 8192
compress_at = 0.8
multitask = "enqueue"
skills = ["math"]
subagents = ["researcher"]

[[agents]]
name = "researcher"
provider = "local"
model = "m"
multitask = "reject"

[[skills]]
name = "math"
description = "Arithmetic"
keywords = ["Calculate", "sum"]
system_prompt = "Use the calculator."
tools = ["calculator"]
provider = "upstream"
model = "gpt-4o"
'''
    bad = '''
[server]
listen = "localhost"
event_retention_runs = 3

[store]
url = "postgres://db/agentd"

[providers.x]
kind = "magic"

[[agents]]
name = "calculator"
provider = "nope"
model = "m"
tools = ["shell", "shell"]
max_iterations = "lots"
compress_at = 1.5
multitask = "later"
skills = ["ghost"]
subagents = ["calculator", "ghost"]
'''
    write("config", "default", default)
    write("config", "full", full)
    write("config", "bad", bad)
    write("config", "unknown-key", '[server]\nlisten = "127.0.0.1:0"\nport = 8080\n')
    write("config", "not-toml", '[server\nlisten = ')
    write("config", "empty", "")


def streams():
    def chunk(delta, finish=None, index=0):
        return "data: " + json.dumps({"id": "chatcmpl-mock-1", "object": "chat.completion.chunk", "created": 1,
                                      "model": "m", "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                                 "finish_reason": finish}]}) + "\n\n"

    usage = 'data: {"id":"chatcmpl-mock-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
    done = "data: [DONE]\n\n"
    text = chunk({"role": "assistant", "content": ""}) + chunk({"content": "Hel"}) + chunk({"content": "lo \u00e9"}) \
        + chunk({}, "stop") + usage + done
    tools = chunk({"role": "assistant", "content": None}) \
        + chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "calculator", "arguments": ""}}]}) \
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"expr"}}]}) \
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "ession\": \"6*7\"}"}}]}) \
        + chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "current_time", "arguments": "{}"}}]}) \
        + chunk({}, "tool_calls") + usage + done
    no_index = chunk({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{\"a\""}}]}) \
        + chunk({"tool_calls": [{"function": {"arguments": ":2}"}}]}) + done
    thinking = chunk({"reasoning_content": "hm, "}) + chunk({"reasoning": "let me see"}) \
        + chunk({"content": "42"}, "stop") + done
    crlf = text.replace("\n", "\r\n").replace("data: [DONE]", ": keep-alive\r\n\r\ndata: [DONE]")
    cut = chunk({"content": "hi"})
    error = 'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
    garbage = chunk({"content": "a"}) + "data: {\"choices\": [this is not json\n\n" + done
    multiline = "event: message\nid: 3\nretry: 10\ndata: {\"choices\":[{\"delta\":\ndata: {\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\n" + done
    for name, body in {"text": text, "tools": tools, "no-index": no_index, "thinking": thinking, "crlf": crlf,
                       "cut-off": cut, "error": error, "garbage": garbage, "multiline": multiline}.items():
        # First byte: how the body is cut into network chunks (see fuzz_targets/openai_sse.rs).
        for pattern in (0, 0x5b):
            write("openai_sse", f"{name}-{pattern:02x}", bytes([pattern]) + body.encode())


def tail():
    def record(session, seq, run, event):
        body = struct.pack("<Q", seq) + struct.pack("<H", len(session)) + session.encode() \
            + struct.pack("<H", len(run)) + run.encode() + event.encode()
        return struct.pack("<II", len(body), zlib.crc32(body)) + body

    def ev(seq, kind, **fields):
        return json.dumps({"seq": seq, "run_id": "r1", "agent": "assistant", "is_subagent": False, "type": kind,
                           **fields}, separators=(",", ":"))

    s1 = b"".join(record("s1", i, "r1", ev(i, "text_delta", delta=f"tok{i} ")) for i in range(1, 6))
    s2 = record("s2", 4, "r1", ev(4, "thinking_delta", delta="hm", step=1)) \
        + record("s2", 5, "r1", ev(5, "tool_started", call_id="c1", tool="calculator", args={"expression": "6*7"}, step=1)) \
        + record("s2", 6, "r1", ev(6, "input_requested", request_id="q1", question="name?"))
    mixed = record("s2", 2, "r1", ev(2, "text_delta", delta="old")) + record("s1", 1, "r1", ev(1, "text_delta", delta="a")) \
        + record("gone", 1, "r1", ev(1, "text_delta", delta="b")) + record("s1", 3, "r1", ev(3, "text_delta", delta="gap")) \
        + record("s1", 2, "r1", ev(2, "text_delta", delta="c"))
    # First byte: flags (bit 0: rewrite the CRCs; see fuzz_targets/sqlite_tail.rs).
    for name, data in {"s1": s1, "s2": s2, "mixed": mixed, "torn": s1 + s2[:-5], "empty": b""}.items():
        write("sqlite_tail", name, b"\x00" + data)
        write("sqlite_tail", name + "-sealed", b"\x01" + data)


def names():
    for i, n in enumerate(["report.pdf", "../../etc/passwd", "C:\\Users\\me\\notes.txt", ".htaccess", "..",
                           "a b-c_d.tar.gz", "\u00e9t\u00e9 \u2603.png", "x" * 150 + ".txt", "   ", "/", "._.",
                           "name\x00.txt"]):
        write("upload_name", str(i), n)


frames()
configs()
streams()
tail()
names()
