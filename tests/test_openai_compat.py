"""OpenAI-shaped methods (issue #16, part 2): ``create_completion`` and
``create_chat_completion`` on both session kinds, validated with the ``openai`` package's
own types -- and end to end through the ``openai`` client, whose HTTP transport hands
the requests to the session (what a minimal server would do).

Chat replies are forced with GBNF grammars on a synthetic model that carries upstream's
Qwen3.5 template, so reasoning, content and tool calls are real generated text parsed by
llama.cpp's chat parser (see tests/test_chat_parse.py).
"""
import json
import math
import sys
import time

import pytest

import mtp_cy
from conftest import make_engine, prompt_of
from test_chat import TOOLS, qwen35_jinja

openai = pytest.importorskip("openai")
from openai.types import Completion as OACompletion                            # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk              # noqa: E402

USER = [{"role": "user", "content": "Weather in Paris?"}]
THINK = "Weather asked.\n"
ANSWER = "It is sunny."
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>")
SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "enum": ["sea", "sky"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["word", "n"], "additionalProperties": False}


def gbnf(text):
    return "root ::= " + json.dumps(text)


@pytest.fixture(scope="module")
def qwen_engines(synthetic):
    sm = synthetic.cached_model(mtp=True, vocab="qwen35", chat_template=qwen35_jinja())
    with mtp_cy.Model(sm.path) as m:
        d = {kind: make_engine(kind, m, n_ctx=1024, n_threads=1) for kind in ("session", "mtp")}
        yield d
        for e in d.values():
            e.close()


@pytest.fixture(scope="module", params=["session", "mtp"])
def qwen(request, qwen_engines):
    return request.param, qwen_engines[request.param]


def validate_completion_chunk(chunk):
    """Streamed legacy completions have ``finish_reason: null`` until the last chunk (as
    OpenAI's API sends them); the openai type spells it as required, so validate the rest
    strictly and the finish_reason by hand."""
    fixed = dict(chunk, choices=[dict(c, finish_reason=c["finish_reason"] or "stop") for c in chunk["choices"]])
    OACompletion.model_validate(fixed)
    return [c["finish_reason"] for c in chunk["choices"]]


def stem(e):
    import os
    return os.path.splitext(os.path.basename(e.model.path))[0]


# ------------------------------------------------------------------ /v1/completions

def test_completion_dict(engine, mtp_sm):
    kind, e = engine
    e.clear_cache()
    p = prompt_of(mtp_sm, 3, 2)
    text = "".join(mtp_sm.words[k] for k in (2, 3, 4))
    t0 = int(time.time())
    r = e.create_completion(text, temperature=0, max_tokens=5)
    v = OACompletion.model_validate(r)
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    assert t0 <= r["created"] <= time.time() + 1 and r["model"] == stem(e)
    assert r["system_fingerprint"].startswith("mtp_cy-")
    assert v.choices[0].text == mtp_sm.greedy(p, 5).text and v.choices[0].finish_reason == "length"
    assert v.choices[0].index == 0 and v.choices[0].logprobs is None
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    # the same prompt again: the prompt cache's share is reported
    r2 = e.create_completion(text, temperature=0, max_tokens=5, model="my-model")
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 and r2["model"] == "my-model"
    assert r2["id"] != r["id"]
    # OpenAI's default max_tokens for completions is 16; token ids and [one prompt] work too
    r3 = e.create_completion([p], temperature=0)
    assert r3["usage"]["completion_tokens"] == 16 and r3["choices"][0]["text"] == mtp_sm.greedy(p, 16).text


def test_completion_finish_reasons(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 5)
    want = mtp_sm.greedy(p, 10)
    stop = mtp_sm.pieces[want.tokens[3]]
    r = e.create_completion(p, temperature=0, max_tokens=10, stop=[stop])
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == mtp_sm.decode(want.tokens[:3])
    r = e.create_completion(p, temperature=0, max_tokens=10, grammar=f'root ::= "{mtp_sm.words[1]}"')
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    for x in (r,):
        OACompletion.model_validate(x)


def test_completion_logprobs(engine, mtp_sm, mtp_model):
    kind, e = engine
    text = "".join(mtp_sm.words[k] for k in (6, 7))
    r = e.create_completion(text, temperature=0, max_tokens=4, logprobs=2)
    lp = OACompletion.model_validate(r).choices[0].logprobs
    c = e.complete(text, temp=0, max_tokens=4, logprobs=True, top_logprobs=2)
    assert lp.tokens == [t.text for t in c.logprobs]
    assert lp.token_logprobs == [t.logprob for t in c.logprobs]
    for tops, t in zip(lp.top_logprobs, c.logprobs):
        assert tops == {mtp_sm.pieces[tid]: v for tid, v in t.top_logprobs}
        assert len(tops) == 2 and tops[t.text] == t.logprob         # greedy: the sampled token is the top one
    # offsets into prompt + completion, as OpenAI counts them
    assert lp.text_offset[0] == len(text)
    full = text + r["choices"][0]["text"]
    for off, tok in zip(lp.text_offset, lp.tokens):
        assert full[off:off + len(tok)] == tok
    # the sampled token itself is always listed (OpenAI's and llama-cpp-python's rule): with
    # the runner-up sampled at a temperature, logprobs=1 gives two entries
    r = e.create_completion(text, temperature=1.5, seed=3, max_tokens=30, logprobs=1)
    lp = r["choices"][0]["logprobs"]
    sizes = set()
    for tok, v, tops in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert tops[tok] == v
        sizes.add(len(tops))
    assert sizes == {1, 2}
    r = e.create_completion(text, temperature=0, max_tokens=2, logprobs=0)
    lp = r["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]


def test_completion_stream(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 8)
    ref = e.create_completion(p, temperature=0, max_tokens=7, logprobs=1)
    chunks = list(e.create_completion(p, temperature=0, max_tokens=7, logprobs=1, stream=True,
                                      stream_options={"include_usage": True}))
    finishes = [validate_completion_chunk(c) for c in chunks[:-1]]
    assert finishes == [[None]] * 7 + [["length"]]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert all(c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 7
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (3, 10)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 2        # the same prompt as ref's
    OACompletion.model_validate(chunks[-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == ref["choices"][0]["text"]
    # log-probabilities split over the chunks add up to the non-streamed ones
    joined = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for c in chunks[:-1]:
        for k in joined:
            joined[k] += (c["choices"][0]["logprobs"] or {}).get(k, [])
    assert joined == ref["choices"][0]["logprobs"]
    # without include_usage: no usage keys, last chunk carries the finish_reason
    chunks = list(e.create_completion(p, temperature=0, max_tokens=3, stream=True))
    assert "usage" not in chunks[0] and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["text"] == ""


def test_completion_parameters_map_to_the_sampler(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 1)
    r = e.create_completion(p, temperature=1.3, top_p=0.9, seed=11, frequency_penalty=0.4, presence_penalty=0.2,
                            top_k=20, min_p=0.01, repeat_penalty=1.1, max_completion_tokens=24)
    want = e.generate(p, temp=1.3, top_p=0.9, seed=11, penalty_freq=0.4, penalty_present=0.2, top_k=20,
                      min_p=0.01, penalty_repeat=1.1, max_tokens=24)
    assert r["choices"][0]["text"] == want and r["usage"]["completion_tokens"] == 24
    assert e.create_completion(p, temperature=0, max_tokens=5, max_completion_tokens=5)["usage"][
        "completion_tokens"] == 5
    # harmless OpenAI parameters are accepted and ignored; neutral values of unsupported ones too
    r = e.create_completion(p, temperature=0, max_tokens=3, user="u", metadata={"a": "b"}, store=False,
                            n=1, best_of=1, echo=False, suffix=None, logit_bias={})
    assert r["choices"][0]["text"] == mtp_sm.greedy(p, 3).text
    r = e.create_completion(p, temperature=0, max_tokens=3, n=None, best_of=None, echo=None, logit_bias=None,
                            stop=None, seed=None, top_p=None, logprobs=None, stream_options=None)
    assert r["choices"][0]["text"] == mtp_sm.greedy(p, 3).text


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n=2), ValueError, "n=2"),
    (dict(best_of=3), ValueError, "best_of"),
    (dict(echo=True), ValueError, "echo"),
    (dict(suffix="x"), ValueError, "suffix"),
    (dict(logit_bias={"50256": -100}), ValueError, "logit_bias"),
    (dict(frobnicate=1), TypeError, "frobnicate"),
    (dict(functions=[{"name": "f"}]), TypeError, "functions"),      # a chat parameter
    (dict(logprobs=True), TypeError, "logprobs"),
    (dict(logprobs=21), ValueError, "logprobs"),
    (dict(stream_options={"include_usage": True}), ValueError, "stream=True"),
    (dict(frequency_penalty=2.5), ValueError, "frequency_penalty"),
    (dict(temperature=-1), ValueError, "temp"),
    (dict(max_tokens=4, max_completion_tokens=5), ValueError, "disagree"),
    (dict(stream="yes"), TypeError, "stream"),
    (dict(response_format={"type": "xml"}), ValueError, "response_format"),
])
def test_completion_refuses_what_it_cannot_honour(engine, mtp_sm, kwargs, exc, match):
    kind, e = engine
    with pytest.raises(exc, match=match):
        e.create_completion(prompt_of(mtp_sm, 2), **kwargs)


def test_completion_batches_are_refused(engine):
    kind, e = engine
    with pytest.raises(ValueError, match="batch"):
        e.create_completion([" the", " sea"])
    with pytest.raises(mtp_cy.SessionBusyError):
        it = e.create_completion(" the", stream=True, max_tokens=5)
        e.create_completion(" sea")
    it.close()
    assert e.create_completion(" the", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_stream_cancelled_and_closed(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3)
    it = e.create_completion(p, temperature=0, max_tokens=100, stream=True, stream_options={"include_usage": True})
    first = next(it)
    assert first["choices"][0]["text"] == mtp_sm.pieces[mtp_sm.next_token(p[-1])]
    e.cancel()
    rest = list(it)
    assert rest[-2]["choices"][0]["finish_reason"] == "stop"         # "cancelled" has no OpenAI word
    assert rest[-1]["usage"]["completion_tokens"] == 1 + len(rest) - 2 < 100
    it = e.create_completion(p, temperature=0, max_tokens=100, stream=True)
    next(it)
    it.close()                                                         # the session is free again
    assert e.create_completion(p, temperature=0, max_tokens=2)["choices"][0]["text"] == mtp_sm.greedy(p, 2).text


# ------------------------------------------------------------------ /v1/chat/completions

def test_chat_reasoning_and_answer(qwen):
    kind, e = qwen
    reply = THINK + "</think>\n\n" + ANSWER
    r = e.create_chat_completion(USER, grammar=gbnf(reply), temperature=0, logprobs=True, top_logprobs=2)
    v = ChatCompletion.model_validate(r)
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
    msg = v.choices[0].message
    assert msg.role == "assistant" and msg.content == ANSWER and msg.tool_calls is None
    assert r["choices"][0]["message"]["reasoning_content"] == THINK
    assert v.choices[0].finish_reason == "stop"
    assert v.usage.prompt_tokens == len(e.model.tokenize(e.model.apply_chat_template(USER)))
    content = v.choices[0].logprobs.content
    assert len(content) == v.usage.completion_tokens
    assert "".join(bytes(x.bytes).decode("utf-8") for x in content) == reply
    for x in content:
        assert len(x.top_logprobs) == 2 and x.logprob <= 0 and math.isfinite(x.logprob)


def test_chat_tool_call_and_its_stream(qwen):
    kind, e = qwen
    reply = THINK + "</think>\n\nLet me check.\n\n" + CALL
    r = e.create_chat_completion(USER, tools=TOOLS, tool_choice="auto", grammar=gbnf(reply), temperature=0)
    v = ChatCompletion.model_validate(r)
    assert v.choices[0].finish_reason == "tool_calls"
    msg = v.choices[0].message
    assert msg.content == "Let me check.\n\n"
    (tc,) = msg.tool_calls
    assert tc.id.startswith("call_") and tc.type == "function"
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    # streamed: deltas of reasoning, content and the tool call, each chunk a valid ChatCompletionChunk
    chunks = list(e.create_chat_completion(USER, tools=TOOLS, grammar=gbnf(reply), temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    assert len({(c["id"], c["created"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-") and chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert all(len(d) == 1 for d in deltas)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THINK
    assert "".join(d.get("content", "") for d in deltas) == "Let me check.\n\n"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all(c["index"] == 0 and set(c) == {"index", "function"} for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == tc.function.arguments
    # order: reasoning, then content, then the call
    order = [next(iter(d)) for d in deltas]
    assert order == sorted(order, key=["reasoning_content", "content", "tool_calls"].index)
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == r["usage"]["completion_tokens"]
    # the openai package's own accumulator rebuilds the same message from the chunks
    from openai.lib.streaming.chat import ChatCompletionStreamState
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "Let me check.\n\n"
    assert final.message.tool_calls[0].function.arguments == tc.function.arguments
    assert final.message.tool_calls[0].id == calls[0]["id"]


def test_chat_stream_logprobs_and_plain_content(qwen):
    kind, e = qwen
    if kind == "mtp":
        pytest.skip("the Session run covers the chunk layout (MTP produces the same tokens)")
    reply = THINK + "</think>\n\n" + ANSWER
    ref = e.create_chat_completion(USER, grammar=gbnf(reply), temperature=0, logprobs=True, top_logprobs=1)
    chunks = list(e.create_chat_completion(USER, grammar=gbnf(reply), temperature=0, logprobs=True,
                                           top_logprobs=1, stream=True))
    lps = []
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        lps += (c["choices"][0]["logprobs"] or {}).get("content") or []
    assert lps == ref["choices"][0]["logprobs"]["content"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # no thinking, no grammar: the greedy words, max_tokens respected, finish "length"
    r = e.create_chat_completion(USER, enable_thinking=False, temperature=0, max_tokens=4)
    ChatCompletion.model_validate(r)
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 4
    assert "reasoning_content" not in r["choices"][0]["message"]


def test_chat_response_format(qwen_engines):
    e = qwen_engines["session"]        # MTP: test_chat_response_format_is_lossless_under_mtp
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    r = e.create_chat_completion(USER, response_format=rf, temperature=0)
    ChatCompletion.model_validate(r)
    doc = json.loads(r["choices"][0]["message"]["content"])
    assert doc["word"] in ("sea", "sky") and 0 <= doc["n"] <= 9 and set(doc) == {"word", "n"}
    assert r["choices"][0]["finish_reason"] == "stop"
    # rendered without an open <think> block
    no_think = e.model.apply_chat_template(USER, enable_thinking=False)
    assert r["usage"]["prompt_tokens"] == len(e.model.tokenize(no_think))
    # the same document as json_schema= on complete_chat, and streamed
    c = e.complete_chat(USER, json_schema=SCHEMA, enable_thinking=False, temp=0)
    assert c.text == r["choices"][0]["message"]["content"]
    chunks = list(e.create_chat_completion(USER, response_format=rf, temperature=0, stream=True))
    assert "".join(x["choices"][0]["delta"].get("content") or "" for x in chunks) == c.text
    # json_object: any JSON object (llama-cpp-python's "schema" key is honoured)
    r = e.create_chat_completion(USER, response_format={"type": "json_object", "schema": SCHEMA}, temperature=0)
    assert json.loads(r["choices"][0]["message"]["content"]) == doc
    with pytest.raises(ValueError, match="tools"):
        e.create_chat_completion(USER, response_format=rf, tools=TOOLS)
    with pytest.raises(ValueError, match="json_schema= or grammar="):
        e.create_chat_completion(USER, response_format=rf, grammar='root ::= "x"')


def test_chat_response_format_is_lossless_under_mtp(qwen_engines):
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    a = qwen_engines["session"].complete_chat(USER, json_schema=SCHEMA, enable_thinking=False, temp=0)
    b = qwen_engines["mtp"].create_chat_completion(USER, response_format=rf, temperature=0)
    assert b["choices"][0]["message"]["content"] == a.text


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n=2), ValueError, "n=2"),
    (dict(tool_choice="required", tools=TOOLS), ValueError, "tool_choice"),
    (dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, tools=TOOLS), ValueError,
     "tool_choice"),
    (dict(parallel_tool_calls=True, tools=TOOLS), ValueError, "parallel_tool_calls"),
    (dict(functions=[{"name": "f", "parameters": {}}]), ValueError, "functions"),
    (dict(function_call="auto"), ValueError, "function_call"),
    (dict(logit_bias={"1": 1}), ValueError, "logit_bias"),
    (dict(modalities=["text", "audio"]), ValueError, "modalities"),
    (dict(reasoning_effort="low"), ValueError, "reasoning_effort"),
    (dict(logprobs=2), TypeError, "logprobs"),
    (dict(top_logprobs=2), ValueError, "logprobs=True"),
    (dict(logprobs=False, top_logprobs=3), ValueError, "logprobs=True"),
    (dict(logprobs=True, top_logprobs=21), ValueError, "top_logprobs"),
    (dict(suffix="x"), TypeError, "suffix"),                     # a completions parameter
    (dict(tools=[{"type": "custom", "custom": {"name": "x"}}]), ValueError, "tools"),
])
def test_chat_refuses_what_it_cannot_honour(qwen_engines, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        qwen_engines["session"].create_chat_completion(USER, **kwargs)


def test_chat_accepts_harmless_parameters(qwen_engines):
    e = qwen_engines["session"]
    r = e.create_chat_completion(USER, enable_thinking=False, temperature=0, max_completion_tokens=2, user="u",
                                 metadata={"k": "v"}, store=False, service_tier="auto", n=1, logit_bias=None,
                                 modalities=["text"], parallel_tool_calls=False, tool_choice="auto",
                                 seed=1, stop=["never"], model="qwen-local")
    assert r["model"] == "qwen-local" and r["usage"]["completion_tokens"] == 2


# ------------------------------------------------------------------ through the openai client

def _client(handler):
    base = openai.DefaultHttpxClient.__mro__[1]          # httpx.Client (openai 1.x/2.x) or httpx2.Client
    httpx = sys.modules[base.__module__.split(".")[0]]
    http = openai.DefaultHttpxClient(transport=httpx.MockTransport(handler))
    return openai.OpenAI(api_key="not-needed", base_url="http://mtp-cy.local/v1", http_client=http,
                         max_retries=0), httpx


def serve(engine):
    """A /v1 endpoint in a few lines: the request body goes to the session as is."""
    def handler(request):
        body = json.loads(request.content)
        stream = body.pop("stream", False)
        try:
            if request.url.path.endswith("/chat/completions"):
                out = engine.create_chat_completion(body.pop("messages"), stream=stream, **body)
            else:
                out = engine.create_completion(body.pop("prompt"), stream=stream, **body)
        except (ValueError, TypeError) as exc:
            return httpx.Response(400, json={"error": {"message": str(exc), "type": "invalid_request_error",
                                                       "param": None, "code": None}})
        if not stream:
            return httpx.Response(200, json=out)
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in out) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})
    client, httpx = _client(handler)
    return client


def test_through_the_openai_client(qwen_engines, mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=128, n_threads=1) as m:
        client = serve(m)
        p = "".join(mtp_sm.words[:3])
        r = client.completions.create(model="synthetic", prompt=p, max_tokens=6, temperature=0, logprobs=1)
        assert isinstance(r, OACompletion)
        assert r.choices[0].text == mtp_sm.greedy(mtp_sm.token_ids[:3], 6).text
        assert r.usage.completion_tokens == 6 and r.model == "synthetic"
        assert r.choices[0].logprobs.tokens == [mtp_sm.pieces[t] for t in mtp_sm.greedy(mtp_sm.token_ids[:3], 6).tokens]
        pieces = [c.choices[0].text for c in client.completions.create(
            model="synthetic", prompt=p, max_tokens=6, temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == r.choices[0].text
    client = serve(qwen_engines["session"])
    reply = THINK + "</think>\n\nLet me check.\n\n" + CALL
    r = client.chat.completions.create(model="qwen", messages=USER, tools=TOOLS, temperature=0,
                                       extra_body={"grammar": gbnf(reply)})
    assert isinstance(r, ChatCompletion) and r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert r.choices[0].message.model_extra["reasoning_content"] == THINK
    with client.chat.completions.stream(model="qwen", messages=USER, tools=TOOLS, temperature=0,
                                        extra_body={"grammar": gbnf(reply)},
                                        stream_options={"include_usage": True}) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"city":"Paris"}'
    assert final.usage.completion_tokens == r.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="n=3"):
        client.chat.completions.create(model="qwen", messages=USER, n=3)
