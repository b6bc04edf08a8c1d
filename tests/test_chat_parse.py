"""Parsed chat replies (issue #16, part 3): reasoning and tool calls split by llama.cpp's
chat parser, end to end with upstream's Qwen3.5 template on a synthetic model.

A GBNF grammar makes the synthetic model write exact text -- a ``<think>`` block closed
by ``</think>`` (the generation prompt of Qwen3.5 already opened it), then an answer, or
Qwen3.5's tool-call markup (``<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n
</parameter>\\n</function>\\n</tool_call>``, as the template renders calls and upstream's
``common/chat-parsers/qwen3-coder.cpp`` parses them) -- so the parser runs on real
generated replies.
"""
import json

import pytest

import mtp_cy
from conftest import make_engine
from test_chat import TOOLS, qwen35_jinja

USER = [{"role": "user", "content": "Weather in Paris?"}]
THINK = "Weather asked.\n"
ANSWER = "It is sunny."
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>")


def gbnf(text):
    return "root ::= " + json.dumps(text)        # a JSON string literal is a valid GBNF literal


@pytest.fixture(scope="module")
def qwen(synthetic):
    sm = synthetic.cached_model(mtp=True, vocab="qwen35", chat_template=qwen35_jinja())
    with mtp_cy.Model(sm.path) as m:
        yield m


@pytest.fixture(scope="module")
def engines(qwen):
    d = {kind: make_engine(kind, qwen, n_ctx=1024, n_threads=1) for kind in ("session", "mtp")}
    yield d
    for e in d.values():
        e.close()


@pytest.fixture(scope="module", params=["session", "mtp"])
def engine(request, engines):
    return request.param, engines[request.param]


_REPLIES = {}


def tool_reply(kind, e):
    """The tool-call reply of ``e`` (generated once per engine: grammar sampling over
    Qwen's 152k-token vocabulary is the slow part of these tests)."""
    if kind not in _REPLIES:
        _REPLIES[kind] = e.complete_chat(USER, tools=TOOLS, grammar=gbnf(THINK + "</think>\n\n" + CALL),
                                         temp=0, max_tokens=200)
    return _REPLIES[kind]


def test_reasoning_and_answer(engine):
    kind, e = engine
    reply = THINK + "</think>\n\n" + ANSWER
    c = e.complete_chat(USER, grammar=gbnf(reply), temp=0, max_tokens=100)
    assert c.text == reply and (c.finish_reason, c.stop_reason) == ("stop", "eog")
    assert c.message == {"role": "assistant", "content": ANSWER, "reasoning_content": THINK}
    assert c.reasoning == THINK and c.tool_calls == []
    # the same through chat(): the stream's completion and its parser
    s = e.chat(USER, grammar=gbnf(reply), temp=0, max_tokens=100)
    assert "".join(s) == reply
    assert s.chat_parser.format == "peg-native"
    assert s.completion.message == c.message


def test_enable_thinking_false(engine, qwen):
    kind, e = engine
    rendered = qwen.apply_chat_template(USER, enable_thinking=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    c = e.complete_chat(USER, enable_thinking=False, grammar=gbnf(ANSWER), temp=0, max_tokens=50)
    assert c.message == {"role": "assistant", "content": ANSWER} and c.reasoning is None
    assert c.usage.prompt_tokens == len(qwen.tokenize(rendered))
    # chat(..., enable_thinking=False) works without a grammar too (the item 6)
    text = "".join(e.chat(USER, enable_thinking=False, temp=0, max_tokens=5))
    assert text and "<think>" not in text
    with pytest.raises(TypeError, match="enable_thinking"):
        e.chat(USER, enable_thinking=False, chat_template_kwargs={"enable_thinking": False})


def test_tool_call(engine, qwen):
    kind, e = engine
    c = tool_reply(kind, e)
    assert c.text == THINK + "</think>\n\n" + CALL
    assert (c.finish_reason, c.stop_reason) == ("tool_calls", "eog")
    assert c.reasoning == THINK
    assert c.tool_calls == [{"type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city":"Paris"}'}}]
    assert json.loads(c.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert not c.message.get("content")
    # the parsed message goes back into the conversation as the template expects it
    nxt = USER + [c.message, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = qwen.apply_chat_template(nxt, tools=TOOLS)
    assert ("<|im_start|>assistant\n<think>\n" + THINK.strip() + "\n</think>\n\n" + CALL + "<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n") in text


def test_tool_call_after_content_and_without_thinking(engines):
    e = engines["session"]
    reply = "Let me check.\n\n" + CALL
    c = e.complete_chat(USER, tools=TOOLS, enable_thinking=False, grammar=gbnf(reply), temp=0, max_tokens=200)
    assert c.finish_reason == "tool_calls"
    assert c.message["content"] == "Let me check.\n\n" and "reasoning_content" not in c.message
    assert [t["function"]["name"] for t in c.tool_calls] == ["get_weather"]


def test_a_reply_cut_by_max_tokens_is_parsed_as_partial(engine):
    kind, e = engine
    reply = THINK + "</think>\n\n" + ANSWER
    full = e.complete_chat(USER, grammar=gbnf(reply), temp=0, max_tokens=100)
    n = 3
    c = e.complete_chat(USER, grammar=gbnf(reply), temp=0, max_tokens=n)
    assert (c.finish_reason, c.stop_reason) == ("length", "max_tokens")
    assert c.tokens == full.tokens[:n]
    assert c.message["reasoning_content"] == c.text and THINK.startswith(c.text)
    assert not c.message.get("content")
    # a tool call cut in its arguments: the partial call is kept, the reason stays "length"
    if kind == "mtp":
        return      # (the same tokens as the Session's: test_mtp_reply_equals_session_reply_under_a_grammar)
    full = tool_reply(kind, e)
    text = ""
    for k, t in enumerate(full.tokens):
        text += e.model.token_to_piece(t).decode("utf-8", "replace")
        if "<parameter=city>\nPa" in text:
            break
    c = e.complete_chat(USER, tools=TOOLS, grammar=gbnf(full.text), temp=0, max_tokens=k + 1)
    assert (c.finish_reason, c.stop_reason) == ("length", "max_tokens")
    assert c.tool_calls[0]["function"]["name"] == "get_weather"
    args = c.tool_calls[0]["function"]["arguments"]
    assert args.startswith('{"city":"Pa') and '{"city":"Paris"}'.startswith(args) and args != '{"city":"Paris"}'


def test_mtp_reply_equals_session_reply_under_a_grammar(engines):
    """A grammar does not break losslessness: the same reply, token for token."""
    a, b = tool_reply("session", engines["session"]), tool_reply("mtp", engines["mtp"])
    assert a.tokens == b.tokens and a.message == b.message
    assert b.stats["drafts_generated"] > 0


def test_partial_parses_only_grow(engine):
    """What streaming relies on: parsing every prefix of a reply gives reasoning, content and
    tool-call arguments that only grow, ending with the final parse."""
    kind, e = engine
    s = e.chat(USER, tools=TOOLS, max_tokens=1, temp=0)
    list(s)
    p = s.chat_parser
    reply = THINK + "</think>\n\nLet me check.\n\n" + CALL
    prev = {"reasoning_content": "", "content": "", "args": ""}
    for i in range(len(reply) + 1):
        msg = p.parse(reply[:i], partial=True)
        cur = {"reasoning_content": msg.get("reasoning_content") or "", "content": msg.get("content") or "",
               "args": "".join(t["function"]["arguments"] for t in msg.get("tool_calls") or ())}
        for k in cur:
            assert cur[k].startswith(prev[k]), (i, k, prev[k], cur[k])
        prev = cur
    final = p.parse(reply)
    assert final["reasoning_content"] == THINK and final["content"] == "Let me check.\n\n"
    assert final["tool_calls"][0]["function"]["arguments"] == prev["args"] == '{"city":"Paris"}'
    with pytest.raises(TypeError):
        p.parse(b"bytes")
    assert isinstance(p.additional_stops, list)


def test_unparseable_reply_falls_back_to_plain_content(caplog):
    """If llama.cpp's parser rejects a finished reply, Completion.message keeps the whole
    text as content (with a warning) instead of raising from stream.completion."""
    from mtp_cy.completion import _parse_reply

    class Broken:
        def parse(self, text, partial=False):
            raise mtp_cy.ChatTemplateError("the chat parser failed on this reply: no match")

    msg = _parse_reply(Broken(), "raw text", "eog")
    assert msg == {"role": "assistant", "content": "raw text"}
    assert "plain content" in caplog.text


def test_chat_applies_the_formats_additional_stops(synthetic):
    """Templates whose reply format ends with a literal stop (upstream's patch for poolside's
    Laguna: ``</assistant>`` spelled as text) stop chat() there, like llama-server."""
    from test_chat import templates_dir
    path = templates_dir() / "poolside-Laguna-XS.2.jinja"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    sm = synthetic.cached_model(mtp=True, chat_template=path.read_text(encoding="utf-8"))
    with mtp_cy.Model(sm.path) as m, mtp_cy.Session(m, n_ctx=2048, n_threads=1) as s:
        it = s.chat(USER, grammar=gbnf("hello there</assistant> and more"), temp=0, max_tokens=40)
        text = "".join(it)
        assert "</assistant>" in it.chat_parser.additional_stops
        assert text == "hello there" and it.stop_reason == "stop_string"
        # the user's own stop strings still apply, first
        it = s.chat(USER, grammar=gbnf("hello there</assistant>"), temp=0, max_tokens=40, stop=" there")
        assert "".join(it) == "hello" and it.stop_string == " there"
