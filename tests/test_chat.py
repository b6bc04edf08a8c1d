"""Chat templates (llama.cpp's own Jinja engine) and chat()/chat_events() on Session and MTP.

Real templates are embedded into synthetic models: the ChatML template that
ships inside ``models/ggml-vocab-qwen35.gguf`` and upstream's
``models/templates/Qwen3.5-4B.jinja`` (thinking, tools).  The rendered text is
compared with hand-written ChatML strings; the generated replies with the
synthetic oracle.
"""
import os
from pathlib import Path

import pytest

import mtp_cy
from conftest import make_engine
from mtp_cy import synthetic as synth

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
CONV_TEXT = ("<|im_start|>system\nBe brief.<|im_end|>\n"
             "<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\nHello!<|im_end|>\n"
             "<|im_start|>user\nBye<|im_end|>\n")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def templates_dir():
    d = os.environ.get("MTP_CY_LLAMA_CPP_DIR")
    root = Path(d) if d else Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp"
    return root / "models" / "templates"


def qwen35_jinja():
    p = templates_dir() / "Qwen3.5-4B.jinja"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p.read_text(encoding="utf-8")


def vocab_template():
    kv = synth._read_gguf_kv(synth.find_vocab("qwen35"), want=lambda k: k == "tokenizer.chat_template")
    if "tokenizer.chat_template" not in kv:
        pytest.skip("ggml-vocab-qwen35.gguf has no chat template")
    return kv["tokenizer.chat_template"][0]


@pytest.fixture(scope="module")
def chatml_sm():
    """qwen35 vocabulary, keeping the vocabulary file's own (ChatML) template."""
    return synth.cached_model(mtp=False, vocab="qwen35")


@pytest.fixture(scope="module")
def qwen_sm():
    """qwen35 vocabulary + MTP head + upstream's Qwen3.5-4B template."""
    return synth.cached_model(mtp=True, vocab="qwen35", chat_template=qwen35_jinja())


@pytest.fixture(scope="module")
def chatml_model(chatml_sm):
    with mtp_cy.Model(chatml_sm.path) as m:
        yield m


@pytest.fixture(scope="module")
def qwen_model(qwen_sm):
    with mtp_cy.Model(qwen_sm.path) as m:
        yield m


# ------------------------------------------------------------------ the synthetic option

def test_synthetic_chat_template_option(chatml_sm, qwen_sm, chatml_model, qwen_model):
    assert chatml_model.chat_template == vocab_template()
    assert qwen_model.chat_template == qwen35_jinja()
    dropped = synth.cached_model(mtp=False, vocab="qwen35", chat_template=False)
    assert len({str(chatml_sm.path), str(qwen_sm.path), str(dropped.path)}) == 3
    with mtp_cy.Model(dropped.path, vocab_only=True) as m:
        assert m.chat_template is None
    # the default leaves the cache key (and so the names of existing files) unchanged
    assert "chat_template" not in synth._cache_key({})
    assert synth._cache_key({"chat_template": "x"})["chat_template"] == "x"
    with pytest.raises(ValueError, match="chat_template"):
        synth.make_model(Path("/nonexistent/never.gguf"), chat_template=3)


# ------------------------------------------------------------------ rendering

def test_vocab_chatml_template(chatml_model):
    assert chatml_model.apply_chat_template(CONV) == CONV_TEXT + "<|im_start|>assistant\n"
    assert chatml_model.apply_chat_template(CONV, add_generation_prompt=False) == CONV_TEXT
    # this template adds a default system prompt when there is none
    assert chatml_model.apply_chat_template(CONV[1:2]) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_qwen35_template_system_history_generation_prompt(qwen_model):
    m = qwen_model
    assert m.apply_chat_template(CONV) == CONV_TEXT + "<|im_start|>assistant\n<think>\n"
    assert m.apply_chat_template(CONV, add_generation_prompt=False) == CONV_TEXT
    assert m.apply_chat_template(CONV, enable_thinking=False) == (
        CONV_TEXT + "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert m.apply_chat_template(CONV, enable_thinking=True) == m.apply_chat_template(CONV)
    # no system message: none is invented
    assert m.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    # reasoning of the turn after the last user message is rendered, older turns drop it
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "r1"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "reasoning_content": "r2"}]
    assert m.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\nd<|im_end|>\n")
    # content given as a list of text parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert m.apply_chat_template(parts) == m.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_qwen35_template_tools(qwen_model):
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "id": "c1", "function": {"name": "get_weather",
                                                              "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = qwen_model.apply_chat_template(msgs, tools=TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n"
                           '<tools>\n{"type": "function", "function": {"name": "get_weather", ')
    assert "</IMPORTANT><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n" in text
    assert text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    # arguments as a JSON string render the same
    msgs[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    assert qwen_model.apply_chat_template(msgs, tools=TOOLS) == text


def test_matches_a_reference_jinja_renderer(qwen_model, chatml_model):
    """Cross-check with the jinja2 package (as transformers renders templates), when installed."""
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    convs = [CONV, CONV[1:], CONV[:2], [{"role": "user", "content": "x"},
                                        {"role": "assistant", "content": "y", "reasoning_content": "z"}]]
    for model in (qwen_model, chatml_model):
        tmpl = env.from_string(model.chat_template)
        for conv in convs:
            for agp in (True, False):
                for think in (True, False):
                    want = tmpl.render(messages=conv, add_generation_prompt=agp, enable_thinking=think,
                                       bos_token="", eos_token="<|endoftext|>")
                    got = model.apply_chat_template(conv, add_generation_prompt=agp, enable_thinking=think)
                    assert got == want, (conv, agp, think)


def test_template_override_and_template_variables(qwen_model, plain_model):
    msgs = [{"role": "user", "content": "Hi"}]
    assert qwen_model.apply_chat_template(msgs, template="chatml") == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    t = ("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
         "{% if add_generation_prompt %}>{% endif %}|{{ who }}|{{ cfg.n }}|{{ flags | length }}")
    assert plain_model.apply_chat_template(msgs, template=t, who="me", cfg={"n": 3}, flags=[1, 2]) == \
        "[user:Hi]>|me|3|2"
    assert plain_model.apply_chat_template(msgs, template=t, add_generation_prompt=False, who="",
                                           cfg={"n": 7}, flags=[]) == "[user:Hi]||7|0"
    # the override does not replace the model's own template for later calls
    assert qwen_model.apply_chat_template(msgs).endswith("<think>\n")


def test_model_without_template_names_the_fix(plain_model, synthetic):
    msgs = [{"role": "user", "content": "Hi"}]
    assert plain_model.chat_template is None
    with pytest.raises(mtp_cy.ChatTemplateError, match=r"no chat template.*template=") as ei:
        plain_model.apply_chat_template(msgs)
    assert isinstance(ei.value, ValueError)
    dropped = synthetic.cached_model(mtp=False, vocab="qwen35", chat_template=False)
    with mtp_cy.Model(dropped.path) as m, mtp_cy.Session(m, n_ctx=64, n_threads=1) as s:
        with pytest.raises(mtp_cy.ChatTemplateError, match="template="):
            s.chat(msgs)
        assert m.apply_chat_template(msgs, template="chatml").startswith("<|im_start|>user")


def test_template_engine_errors_become_python_exceptions(qwen_model, plain_model):
    msgs = [{"role": "user", "content": "Hi"}]
    for bad in ("{% for %}", "{{ x ", "{% if x %}never closed"):
        with pytest.raises(mtp_cy.ChatTemplateError, match="invalid chat template"):
            plain_model.apply_chat_template(msgs, template=bad)
    with pytest.raises(mtp_cy.ChatTemplateError, match="nosuchfilter"):
        plain_model.apply_chat_template(msgs, template="{{ messages[0].content | nosuchfilter }}")
    # the template's own raise_exception()
    with pytest.raises(mtp_cy.ChatTemplateError, match="No user query found"):
        qwen_model.apply_chat_template([{"role": "system", "content": "only a system message"}])
    with pytest.raises(mtp_cy.ChatTemplateError, match="System message must be at the beginning"):
        qwen_model.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    # still fine afterwards
    assert qwen_model.apply_chat_template(msgs).startswith("<|im_start|>user\nHi")


@pytest.mark.parametrize("messages, exc, match", [
    ([], ValueError, "empty"),
    ("hello", TypeError, "list"),
    ({"role": "user", "content": "x"}, TypeError, "list"),
    (None, TypeError, "list"),
    ([{"role": "user", "content": "x"}, "oops"], ValueError, r"messages\[1\]"),
    ([{"content": "x"}], ValueError, r"messages\[0\].*'role'"),
    ([{"role": "user", "content": "x"}, {"role": "", "content": "y"}], ValueError, r"messages\[1\]\['role'\]"),
    ([{"role": 3, "content": "x"}], ValueError, r"messages\[0\]\['role'\]"),
    ([{"role": "user"}], ValueError, r"messages\[0\].*'content'"),
    ([{"role": "user", "content": 5}], ValueError, r"messages\[0\]\['content'\]"),
    ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], ValueError, r"messages\[0\]\['content'\]\[0\]"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": 1}],
     ValueError, r"messages\[1\]\['reasoning_content'\]"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": "f"}]}], ValueError,
     r"messages\[0\]\['tool_calls'\]\[0\]"),
])
def test_bad_messages(qwen_model, messages, exc, match):
    with pytest.raises(exc, match=match):
        qwen_model.apply_chat_template(messages)


def test_bad_template_arguments(qwen_model):
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TypeError, match="enable_thinking"):
        qwen_model.apply_chat_template(msgs, enable_thinking="no")
    with pytest.raises(TypeError, match="JSON"):
        qwen_model.apply_chat_template(msgs, when=object())
    with pytest.raises(TypeError, match="add_generation_prompt"):
        qwen_model.apply_chat_template(msgs, add_generation_prompt=1)
    with pytest.raises(TypeError, match="template"):
        qwen_model.apply_chat_template(msgs, template=b"{{ x }}")
    with pytest.raises(ValueError, match="template"):
        qwen_model.apply_chat_template(msgs, template="  ")
    with pytest.raises(TypeError, match="messages"):
        qwen_model.apply_chat_template(msgs, messages=[])
    with pytest.raises((TypeError, ValueError), match="tools"):
        qwen_model.apply_chat_template(msgs, tools={"name": "f"})
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        qwen_model.apply_chat_template(msgs, tools=[{"type": "function"}])


def test_closed_model(qwen_sm):
    m = mtp_cy.Model(qwen_sm.path, vocab_only=True)
    assert m.apply_chat_template(CONV).endswith("<think>\n")
    m.close()
    with pytest.raises(mtp_cy.ClosedError):
        m.apply_chat_template(CONV)


# ------------------------------------------------------------------ chat() on both engines

@pytest.fixture(scope="module", params=["session", "mtp"])
def engine(request, qwen_model):
    e = make_engine(request.param, qwen_model, n_ctx=512, n_threads=1)
    yield request.param, e
    e.close()


def expected_reply(kind, sm, model, rendered, max_tokens):
    toks = list(model.tokenize(rendered, add_special=True, parse_special=True))
    if kind == "session":
        return toks, sm.greedy(toks, max_tokens)
    return toks, sm.predict(toks, max_tokens, 3, n_ctx=512)


def test_chat_generates_the_reply_to_the_rendered_conversation(engine, qwen_sm, qwen_model):
    kind, e = engine
    rendered = qwen_model.apply_chat_template(CONV)
    toks, want = expected_reply(kind, qwen_sm, qwen_model, rendered, 12)
    # special tokens were parsed: <|im_start|> / <|im_end|> are single tokens
    im_start = qwen_model.tokenize(IM_START, add_special=False, parse_special=True)
    assert len(im_start) == 1 and toks.count(int(im_start[0])) == 5
    e.reset_stats()
    pieces = list(e.chat(CONV, max_tokens=12, temp=0))
    assert "".join(pieces) == want.text == e.generate(rendered, max_tokens=12, temp=0)
    st = e.stats()
    assert st["prompt_tokens"] == 2 * len(toks)
    if kind == "mtp":
        e.reset_stats()
        list(e.chat(CONV, max_tokens=12, temp=0))
        st = e.stats()
        assert (st["iters"], st["drafts_generated"], st["drafts_accepted"], st["tokens_emitted"]) == \
            (want.iters, want.drafts_generated, want.drafts_accepted, want.tokens_emitted)


def test_chat_events_options_and_template_kwargs(engine, qwen_sm, qwen_model):
    kind, e = engine
    no_think = qwen_model.apply_chat_template(CONV, enable_thinking=False)
    assert no_think != qwen_model.apply_chat_template(CONV)
    _, want = expected_reply(kind, qwen_sm, qwen_model, no_think, 10)
    events = list(e.chat_events(CONV, chat_template_kwargs={"enable_thinking": False}, max_tokens=10, temp=0,
                                emit_stats_every=5))
    assert [x[1] for x in events if x[0] == "token"] == want.tokens
    assert [x[0] for x in events].count("stats") == 2
    assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "max_tokens"
    # stop strings apply to the reply
    stop = want.text[15:19]
    events = list(e.chat_events(CONV, chat_template_kwargs={"enable_thinking": False}, max_tokens=10, temp=0,
                                stop=stop))
    assert events[-1] == ("stop", stop)
    assert "".join(x[2] for x in events if x[0] == "token") == want.text[:want.text.find(stop)]
    # a template override in chat()
    chatml = qwen_model.apply_chat_template(CONV, template="chatml")
    _, want2 = expected_reply(kind, qwen_sm, qwen_model, chatml, 6)
    assert "".join(e.chat(CONV, template="chatml", max_tokens=6, temp=0)) == want2.text


def test_chat_errors_leave_the_session_usable(engine, qwen_sm, qwen_model):
    kind, e = engine
    with pytest.raises(ValueError, match=r"messages\[2\]"):
        e.chat(CONV[:2] + [{"role": "user"}], max_tokens=4)
    with pytest.raises(TypeError, match="chat_template_kwargs"):
        e.chat(CONV, chat_template_kwargs=[("enable_thinking", False)])
    with pytest.raises(TypeError, match="temperature"):
        e.chat(CONV, temperature=0.1)
    with pytest.raises(mtp_cy.ChatTemplateError):
        e.chat_events([{"role": "system", "content": "x"}])
    it = e.chat(CONV, max_tokens=5, temp=0)
    next(it)
    with pytest.raises(mtp_cy.SessionBusyError):
        e.chat(CONV, max_tokens=5)
    it.close()
    rendered = qwen_model.apply_chat_template(CONV)
    _, want = expected_reply(kind, qwen_sm, qwen_model, rendered, 5)
    assert "".join(e.chat(CONV, max_tokens=5, temp=0)) == want.text


def test_chat_on_a_session_outliving_its_closed_model(qwen_sm):
    """model.close() is deferred while a session uses the weights: chat() keeps working."""
    m = mtp_cy.Model(qwen_sm.path)
    rendered = m.apply_chat_template(CONV)
    with mtp_cy.MTP(m, n_draft=3, n_ctx=256, n_threads=1) as e:
        m.close()
        with pytest.raises(mtp_cy.ClosedError):
            m.apply_chat_template(CONV)
        want = qwen_sm.predict(_tokens(qwen_sm, rendered), 6, 3, n_ctx=256)
        assert "".join(e.chat(CONV, max_tokens=6, temp=0)) == want.text
    assert m.closed


def _tokens(sm, text):
    with mtp_cy.Model(sm.path, vocab_only=True) as v:
        return list(v.tokenize(text, add_special=True, parse_special=True))
