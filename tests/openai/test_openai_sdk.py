"""agentd's OpenAI-compatible surfaces (SPEC.md section 8) driven by the official `openai` Python SDK, against
the real agentd binary and the mock upstream binary. Run: tests/openai/run.sh (scripts/test.sh does).

The mock follows directives in the last user message: `tokens=N`, `delay_ms=D`, `think`, `calc: EXPR` (a call
of `calculator`); after a tool result it answers `The result is <result>.`; otherwise `echo: <text>`. The agent
`careful` calls `calculator` only once a person allows it (`approve = ["calculator"]`).
"""

import json
import time
import unittest

import openai

from harness import KEY, Agentd, Mock


def setUpModule():
    global MOCK, SERVER, CLIENT
    MOCK = Mock()
    SERVER = Agentd(MOCK.base_url).start()
    CLIENT = openai.OpenAI(base_url=SERVER.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def tearDownModule():
    SERVER.cleanup()
    MOCK.stop()


def sessions():
    return SERVER.native("GET", "/v1/sessions?limit=200")


def messages(session_id):
    return SERVER.native("GET", f"/v1/sessions/{session_id}/messages")


def session_of_chat(completion_id):
    """The session of a chat completion: its id is `chatcmpl-<run id>`; the run is found in the native API."""
    run_id = completion_id.removeprefix("chatcmpl-")
    for s in sessions():
        if any(r["id"] == run_id for r in SERVER.native("GET", f"/v1/sessions/{s['id']}/runs")):
            return s
    raise AssertionError(f"no session has the run {run_id}")


class Models(unittest.TestCase):
    def test_every_agent_is_a_model(self):
        models = CLIENT.models.list()
        ids = [m.id for m in models.data]
        self.assertEqual(ids, ["assistant", "bare", "careful"])
        self.assertTrue(all(m.object == "model" and m.owned_by == "agentd" for m in models.data))
        self.assertEqual(CLIENT.models.retrieve("bare").id, "bare")


class Errors(unittest.TestCase):
    def test_a_bad_key_is_an_authentication_error(self):
        bad = openai.OpenAI(base_url=SERVER.url + "/v1", api_key="sk-wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError) as e:
            bad.models.list()
        self.assertEqual(e.exception.status_code, 401)
        self.assertEqual(e.exception.code, "invalid_api_key")
        with self.assertRaises(openai.AuthenticationError):
            bad.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "hi"}])

    def test_an_unknown_model_or_response_is_not_found(self):
        with self.assertRaises(openai.NotFoundError) as e:
            CLIENT.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(e.exception.code, "model_not_found")
        with self.assertRaises(openai.NotFoundError):
            CLIENT.responses.create(model="gpt-nope", input="hi")
        with self.assertRaises(openai.NotFoundError):
            CLIENT.responses.retrieve("resp_" + "0" * 64)
        with self.assertRaises(openai.NotFoundError):
            CLIENT.responses.retrieve("nonsense")

    def test_a_malformed_request_is_a_bad_request(self):
        with self.assertRaises(openai.BadRequestError) as e:
            CLIENT.chat.completions.create(model="assistant", messages=[])
        self.assertEqual(e.exception.body["type"], "invalid_request_error")
        with self.assertRaises(openai.BadRequestError):
            CLIENT.chat.completions.create(model="assistant", messages=[{"role": "wizard", "content": "hi"}])
        with self.assertRaises(openai.BadRequestError):
            CLIENT.post("/chat/completions", body={"model": "assistant"}, cast_to=object)

    def test_over_the_rate_limit_is_a_rate_limit_error(self):
        limited = Agentd(MOCK.base_url, server_extra="rate_limit_per_min = 1").start()
        try:
            c = openai.OpenAI(base_url=limited.url + "/v1", api_key=KEY, max_retries=0)
            c.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "one"}])
            with self.assertRaises(openai.RateLimitError) as e:
                c.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "two"}])
            self.assertEqual(e.exception.status_code, 429)
            self.assertIn("retry-after", e.exception.response.headers)
        finally:
            limited.cleanup()


class ChatCompletions(unittest.TestCase):
    def test_plain(self):
        c = CLIENT.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "hello there"}])
        self.assertEqual(c.object, "chat.completion")
        self.assertEqual(c.model, "assistant")
        self.assertEqual(c.choices[0].message.content, "echo: hello there")
        self.assertEqual(c.choices[0].finish_reason, "stop")
        self.assertGreater(c.usage.total_tokens, 0)
        # The session is the caller's, in the native API, marked as a chat's.
        s = session_of_chat(c.id)
        self.assertEqual(s["metadata"], {"source": "chat.completions"})
        self.assertEqual([(m["role"], m["content"]) for m in messages(s["id"])],
                         [("user", "hello there"), ("assistant", "echo: hello there")])

    def test_streamed_with_usage(self):
        stream = CLIENT.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "tokens=6"}],
            stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        self.assertEqual(text, "tok0 tok1 tok2 tok3 tok4 tok5")
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        self.assertEqual(finishes, ["stop"])
        self.assertEqual(chunks[-1].choices, [])
        self.assertGreater(chunks[-1].usage.completion_tokens, 0)
        self.assertTrue(all(ch.usage is None for ch in chunks[:-1]))
        self.assertEqual(len({ch.id for ch in chunks}), 1)

    def test_thinking_is_reasoning_content(self):
        stream = CLIENT.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "think then answer"}], stream=True)
        reasoning, text = "", ""
        for ch in stream:
            if ch.choices:
                d = ch.choices[0].delta
                reasoning += (d.model_extra or {}).get("reasoning_content") or ""
                text += d.content or ""
        self.assertEqual(reasoning, "Let me think about this.")
        self.assertEqual(text, "echo: think then answer")
        c = CLIENT.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "think again"}])
        self.assertEqual(c.choices[0].message.model_extra["reasoning_content"], "Let me think about this.")

    def test_the_agents_own_tools_run_server_side(self):
        c = CLIENT.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "calc: 6*7"}])
        self.assertEqual(c.choices[0].message.content, "The result is 42.")
        self.assertIsNone(c.choices[0].message.tool_calls)
        self.assertEqual(c.choices[0].finish_reason, "stop")

    def test_a_multi_turn_chat_is_one_session(self):
        history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"}]
        before = len(sessions())
        for n, question in enumerate(["second question", "third question"]):
            c = CLIENT.chat.completions.create(model="assistant", messages=history)
            history += [{"role": "assistant", "content": c.choices[0].message.content},
                        {"role": "user", "content": question}]
        last = CLIENT.chat.completions.create(model="assistant", messages=history, stream=True)
        answer = "".join(ch.choices[0].delta.content or "" for ch in last if ch.choices)
        self.assertEqual(answer, "echo: third question")
        self.assertEqual(len(sessions()), before + 1, "three turns of one chat make one session")
        s = sessions()[0]
        self.assertEqual([m["role"] for m in messages(s["id"])],
                         ["system", "user", "assistant", "user", "assistant", "user", "assistant"])
        # A history that is not what the server answered (an edited answer) starts a new session.
        edited = history[:2] + [{"role": "assistant", "content": "something else"}, {"role": "user", "content": "hm"}]
        CLIENT.chat.completions.create(model="assistant", messages=edited)
        self.assertEqual(len(sessions()), before + 2)

    def test_a_client_tool_round_trip(self):
        tools = [{"type": "function", "function": {
            "name": "calculator", "description": "the client's own calculator",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]
        history = [{"role": "user", "content": "calc: 6*7"}]
        c = CLIENT.chat.completions.create(model="bare", messages=history, tools=tools)
        choice = c.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        call = choice.message.tool_calls[0]
        self.assertEqual(call.function.name, "calculator")
        self.assertEqual(json.loads(call.function.arguments), {"expression": "6*7"})
        history += [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "42"}]
        before = len(sessions())
        c2 = CLIENT.chat.completions.create(model="bare", messages=history, tools=tools)
        self.assertEqual(c2.choices[0].message.content, "The result is 42.")
        self.assertEqual(c2.choices[0].finish_reason, "stop")
        self.assertEqual(len(sessions()), before, "the results continue the session of the call")
        s = session_of_chat(c2.id)
        self.assertEqual([m["role"] for m in messages(s["id"])], ["user", "assistant", "tool", "assistant"])

    def test_a_client_tool_call_streams_as_tool_call_deltas(self):
        tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
        chunks = list(CLIENT.chat.completions.create(
            model="bare", messages=[{"role": "user", "content": "calc: 1+2"}], tools=tools, stream=True))
        calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].function.name, "calculator")
        self.assertEqual(json.loads(calls[0].function.arguments), {"expression": "1+2"})
        self.assertEqual([ch.choices[0].finish_reason for ch in chunks if ch.choices][-1], "tool_calls")


def wait_status(rid, statuses, timeout=30):
    deadline = time.time() + timeout
    while True:
        r = CLIENT.responses.retrieve(rid)
        if r.status in statuses:
            return r
        if time.time() > deadline:
            raise AssertionError(f"response {rid} stayed {r.status}")
        time.sleep(0.05)


class Responses(unittest.TestCase):
    def test_plain(self):
        r = CLIENT.responses.create(model="assistant", input="hello responses")
        self.assertTrue(r.id.startswith("resp_"))
        self.assertEqual(r.status, "completed")
        self.assertEqual(r.output_text, "echo: hello responses")
        self.assertGreater(r.usage.total_tokens, 0)
        again = CLIENT.responses.retrieve(r.id)
        self.assertEqual(again.output_text, "echo: hello responses")
        self.assertEqual(again.status, "completed")
        sid = r.metadata["agentd_session_id"]
        self.assertEqual(SERVER.native("GET", f"/v1/sessions/{sid}")["metadata"], {"source": "responses"})

    def test_streamed_with_sequence_numbers(self):
        events = list(CLIENT.responses.create(model="assistant", input="tokens=5", stream=True))
        types = [e.type for e in events]
        self.assertEqual(types[:2], ["response.created", "response.in_progress"])
        self.assertEqual(types[-1], "response.completed")
        self.assertEqual([e.sequence_number for e in events], list(range(len(events))))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        self.assertEqual(text, "tok0 tok1 tok2 tok3 tok4")
        self.assertIn("response.output_item.added", types)
        self.assertIn("response.output_text.done", types)
        self.assertEqual(events[-1].response.output_text, text)

    def test_server_side_tools_are_items(self):
        r = CLIENT.responses.create(model="assistant", input="calc: 6*7")
        self.assertEqual(r.output_text, "The result is 42.")
        calls = [o for o in r.output if o.type == "mcp_call"]
        self.assertEqual(len(calls), 1)
        self.assertEqual((calls[0].name, calls[0].server_label, calls[0].output), ("calculator", "agentd", "42"))

    def test_background_then_retrieve(self):
        r = CLIENT.responses.create(model="assistant", input="tokens=20 delay_ms=20", background=True)
        self.assertIn(r.status, ("queued", "in_progress"))
        self.assertTrue(r.background)
        done = wait_status(r.id, ("completed",))
        self.assertEqual(done.output_text, " ".join(f"tok{i}" for i in range(20)))

    def test_a_cut_stream_resumes_with_starting_after(self):
        stream = CLIENT.responses.create(model="assistant", input="tokens=30 delay_ms=20", stream=True)
        seen = []
        for e in stream:
            seen.append(e)
            if len(seen) == 6:
                break
        stream.close()
        rid = seen[0].response.id
        rest = list(CLIENT.responses.retrieve(rid, stream=True, starting_after=seen[-1].sequence_number))
        numbers = [e.sequence_number for e in seen + rest]
        self.assertEqual(numbers, list(range(len(numbers))), "no event lost, none twice")
        self.assertEqual(rest[-1].type, "response.completed")
        text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
        self.assertEqual(text, " ".join(f"tok{i}" for i in range(30)))
        # The same stream again from the start is the same events.
        again = list(CLIENT.responses.retrieve(rid, stream=True))
        self.assertEqual([(e.sequence_number, e.type) for e in again], [(e.sequence_number, e.type) for e in seen + rest])

    def test_cancel(self):
        r = CLIENT.responses.create(model="assistant", input="tokens=400 delay_ms=25", background=True)
        wait_status(r.id, ("in_progress",))
        time.sleep(0.3)
        cancelled = CLIENT.responses.cancel(r.id)
        self.assertEqual(cancelled.status, "cancelled")
        self.assertEqual(CLIENT.responses.retrieve(r.id).status, "cancelled")
        events = list(CLIENT.responses.retrieve(r.id, stream=True))
        self.assertEqual(events[-1].type, "response.incomplete")

    def test_delete(self):
        r = CLIENT.responses.create(model="assistant", input="delete me")
        self.assertIsNone(CLIENT.responses.delete(r.id))
        with self.assertRaises(openai.NotFoundError):
            CLIENT.responses.retrieve(r.id)
        with self.assertRaises(openai.NotFoundError):
            CLIENT.responses.create(model="assistant", input="more", previous_response_id=r.id)

    def test_a_chain_of_three(self):
        r1 = CLIENT.responses.create(model="assistant", input="one")
        r2 = CLIENT.responses.create(model="assistant", input="two", previous_response_id=r1.id)
        r3 = CLIENT.responses.create(model="assistant", input="three", previous_response_id=r2.id)
        self.assertEqual(r3.output_text, "echo: three")
        sid = r1.metadata["agentd_session_id"]
        self.assertEqual({r.metadata["agentd_session_id"] for r in (r1, r2, r3)}, {sid})
        self.assertEqual([m["content"] for m in messages(sid)],
                         ["one", "echo: one", "two", "echo: two", "three", "echo: three"])

    def test_a_client_function_round_trip(self):
        tools = [{"type": "function", "name": "calculator", "description": "client side",
                  "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}]
        r = CLIENT.responses.create(model="bare", input="calc: 2+3", tools=tools)
        calls = [o for o in r.output if o.type == "function_call"]
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].name, "calculator")
        self.assertEqual(json.loads(calls[0].arguments), {"expression": "2+3"})
        r2 = CLIENT.responses.create(
            model="bare", previous_response_id=r.id, tools=tools,
            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "5"}])
        self.assertEqual(r2.output_text, "The result is 5.")


def approval(request_id, approve=True, reason=None):
    item = {"type": "mcp_approval_response", "approval_request_id": request_id, "approve": approve}
    if reason is not None:
        item["reason"] = reason
    return [item]


class Approvals(unittest.TestCase):
    """OpenAI's remote MCP approval flow: a response ends with its `mcp_approval_request`; the client answers with
    an `mcp_approval_response` in a new response continuing it, which carries the rest of the run."""

    def asked(self, expression):
        r = CLIENT.responses.create(model="careful", input=f"calc: {expression}")
        self.assertEqual(r.status, "completed")
        self.assertEqual([o.type for o in r.output], ["mcp_approval_request"])
        request = r.output[0]
        self.assertEqual((request.server_label, request.name), ("agentd", "calculator"))
        self.assertEqual(json.loads(request.arguments), {"expression": expression})
        return r, request

    def test_an_approval_answered_through_the_api(self):
        r, request = self.asked("6*7")
        sid, run_id = r.metadata["agentd_session_id"], r.metadata["agentd_run_id"]
        # The run waits meanwhile (the native API shows it); the response reads the same.
        self.assertEqual(SERVER.native("GET", f"/v1/sessions/{sid}/runs/{run_id}")["status"], "waiting_input")
        self.assertEqual(CLIENT.responses.retrieve(r.id).output[0].id, request.id)
        r2 = CLIENT.responses.create(model="careful", previous_response_id=r.id, input=approval(request.id))
        self.assertEqual(r2.status, "completed")
        self.assertEqual(r2.previous_response_id, r.id)
        self.assertEqual(r2.metadata["agentd_run_id"], run_id, "the same run, carried on")
        call = [o for o in r2.output if o.type == "mcp_call"]
        self.assertEqual([(c.name, c.output, c.approval_request_id) for c in call], [("calculator", "42", request.id)])
        self.assertEqual(r2.output_text, "The result is 42.")
        self.assertGreater(r2.usage.total_tokens, 0)
        self.assertEqual(SERVER.native("GET", f"/v1/sessions/{sid}/runs/{run_id}")["status"], "completed")
        # The chain goes on from the last response.
        r3 = CLIENT.responses.create(model="careful", previous_response_id=r2.id, input="thanks")
        self.assertEqual(r3.output_text, "echo: thanks")

    def test_an_approval_streamed(self):
        with CLIENT.responses.stream(model="careful", input="calc: 2+3") as stream:
            events = list(stream)
            first = stream.get_final_response()
        self.assertEqual([e.sequence_number for e in events], list(range(len(events))))
        added = [e.item.type for e in events if e.type == "response.output_item.added"]
        self.assertEqual(added, ["mcp_approval_request"])
        self.assertEqual(first.status, "completed")
        request = first.output[-1]
        self.assertEqual(request.type, "mcp_approval_request")
        rest = list(CLIENT.responses.create(
            model="careful", previous_response_id=first.id, input=approval(request.id), stream=True))
        types = [e.type for e in rest]
        self.assertEqual(types[:2], ["response.created", "response.in_progress"])
        self.assertEqual(types[-1], "response.completed")
        self.assertIn("response.mcp_call.completed", types)
        self.assertEqual([e.sequence_number for e in rest], list(range(len(rest))))
        text = "".join(e.delta for e in rest if e.type == "response.output_text.delta")
        self.assertEqual(text, "The result is 5.")
        # Both responses stream again the same.
        again = list(CLIENT.responses.retrieve(first.id, stream=True))
        self.assertEqual([(e.sequence_number, e.type) for e in again], [(e.sequence_number, e.type) for e in events])
        again = list(CLIENT.responses.retrieve(rest[0].response.id, stream=True))
        self.assertEqual([(e.sequence_number, e.type) for e in again], [(e.sequence_number, e.type) for e in rest])

    def test_a_denial_with_its_reason(self):
        r, request = self.asked("1/0")
        r2 = CLIENT.responses.create(model="careful", previous_response_id=r.id,
                                     input=approval(request.id, approve=False, reason="not today"))
        call = [o for o in r2.output if o.type == "mcp_call"][0]
        self.assertEqual(call.status, "failed")
        self.assertIn("not today", call.error)
        self.assertEqual(r2.output_text, "The result is the call was denied and did not run: not today.")

    def test_a_second_answer_is_refused(self):
        r, request = self.asked("3*3")
        CLIENT.responses.create(model="careful", previous_response_id=r.id, input=approval(request.id))
        with self.assertRaises(openai.ConflictError) as e:
            CLIENT.responses.create(model="careful", previous_response_id=r.id, input=approval(request.id, approve=False))
        self.assertEqual(e.exception.status_code, 409)
        with self.assertRaises(openai.NotFoundError):
            CLIENT.responses.create(model="careful", previous_response_id=r.id, input=approval("mcpr_" + "0" * 32))
        with self.assertRaises(openai.BadRequestError):
            CLIENT.responses.create(model="careful", input=approval(request.id))

    def test_cancelling_a_run_that_waits(self):
        r, request = self.asked("5*5")
        self.assertEqual(CLIENT.responses.cancel(r.id).status, "completed", "the response that asked")
        self.assertEqual(wait_status(r.metadata["agentd_next_response_id"], ("cancelled",)).output, [])
        with self.assertRaises(openai.ConflictError):
            CLIENT.responses.create(model="careful", previous_response_id=r.id, input=approval(request.id))

    def test_an_approval_decided_natively_is_followed_through_the_api(self):
        r, request = self.asked("7*6")
        sid, run_id = r.metadata["agentd_session_id"], r.metadata["agentd_run_id"]
        request_id = request.id.removeprefix("mcpr_")
        SERVER.native("POST", f"/v1/sessions/{sid}/runs/{run_id}/approvals/{request_id}", {"decision": "allow"})
        done = wait_status(r.metadata["agentd_next_response_id"], ("completed",))
        self.assertEqual(done.output_text, "The result is 42.")
        with self.assertRaises(openai.ConflictError):
            CLIENT.responses.create(model="careful", previous_response_id=r.id, input=approval(request.id))


class AcrossARestart(unittest.TestCase):
    def test_a_stream_resumes_after_a_restart(self):
        server = Agentd(MOCK.base_url).start()
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
            before = list(c.responses.create(model="assistant", input="tokens=12", stream=True))
            rid = before[0].response.id
            server.stop()
            server.start()
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
            after = list(c.responses.retrieve(rid, stream=True, starting_after=7))
            self.assertEqual([(e.sequence_number, e.type) for e in after],
                             [(e.sequence_number, e.type) for e in before[8:]])
            self.assertEqual(c.responses.retrieve(rid).output_text, " ".join(f"tok{i}" for i in range(12)))
        finally:
            server.cleanup()


if __name__ == "__main__":
    unittest.main()
