"""Inconsistencies fixed by issue #16 (part 6), one test each."""
import logging
import os

import pytest

import mtp_cy
from conftest import prompt_of


def test_closed_error_is_not_a_value_error(mtp_model, mtp_sm):
    assert issubclass(mtp_cy.ClosedError, mtp_cy.MTPError)
    assert issubclass(mtp_cy.ClosedError, RuntimeError)
    assert not issubclass(mtp_cy.ClosedError, ValueError)
    s = mtp_cy.Session(mtp_model, n_ctx=64, n_threads=1)
    it = s.stream(prompt_of(mtp_sm, 2), max_tokens=50, temp=0)
    next(it)
    s.close()
    for call in (lambda: s.generate(" the"), lambda: next(it), lambda: s.clear_cache()):
        try:
            call()
        except ValueError:          # an argument error handler must not swallow it
            pytest.fail("ClosedError caught as a ValueError")
        except mtp_cy.ClosedError:
            pass
        else:
            pytest.fail("no ClosedError")
    with mtp_cy.Model(mtp_model.path, vocab_only=True) as v:
        pass
    with pytest.raises(mtp_cy.ClosedError) as ei:
        v.tokenize("x")
    assert not isinstance(ei.value, ValueError)


def test_emit_stats_every_everywhere(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3)
    text = mtp_sm.greedy(p, 6).text
    # accepted (and without effect) where there are no events
    assert "".join(e.stream(p, max_tokens=6, temp=0, emit_stats_every=2)) == text
    assert e.generate(p, max_tokens=6, temp=0, emit_stats_every=2) == text
    assert e.complete(p, max_tokens=6, temp=0, emit_stats_every=2).text == text
    # statistics events every 2 delivered tokens
    events = list(e.stream_events(p, max_tokens=6, temp=0, emit_stats_every=2))
    kinds = [x[0] for x in events]
    assert kinds == ["token", "token", "stats"] * 3 + ["done"]
    assert [x[1]["calls"] for x in events if x[0] == "stats"] == [e.stats()["calls"]] * 3
    # keyword-only in stream_events
    with pytest.raises(TypeError):
        e.stream_events(p, 2)
    with pytest.raises(ValueError, match="emit_stats_every"):
        e.stream_events(p, emit_stats_every=-1)


def test_emit_stats_every_in_chat(chatml_engine):
    kind, e = chatml_engine
    msgs = [{"role": "user", "content": "Hi"}]
    a = "".join(e.chat(msgs, max_tokens=4, temp=0, emit_stats_every=2))
    events = list(e.chat_events(msgs, max_tokens=4, temp=0, emit_stats_every=2))
    assert [x[0] for x in events] == ["token", "token", "stats", "token", "token", "stats", "done"]
    assert "".join(x[2] for x in events if x[0] == "token") == a


@pytest.fixture(scope="module", params=["session", "mtp"])
def chatml_engine(request, synthetic):
    sm = synthetic.cached_model(mtp=True, vocab="qwen35")      # the vocabulary's ChatML template
    with mtp_cy.Model(sm.path) as m:
        e = (mtp_cy.Session(m, n_ctx=256, n_threads=1) if request.param == "session"
             else mtp_cy.MTP(m, n_draft=3, n_ctx=256, n_threads=1))
        with e:
            yield request.param, e


def test_chat_enable_thinking_false_is_accepted_by_any_template(chatml_engine):
    """enable_thinking is a template variable: a template that ignores it renders the same."""
    kind, e = chatml_engine
    msgs = [{"role": "user", "content": "Hi"}]
    a = e.complete_chat(msgs, max_tokens=4, temp=0)
    b = e.complete_chat(msgs, max_tokens=4, temp=0, enable_thinking=False)
    assert (a.text, a.usage.prompt_tokens) == (b.text, b.usage.prompt_tokens)
    with pytest.raises(TypeError, match="enable_thinking"):
        e.chat(msgs, enable_thinking="no")


def test_tokenize_parses_special_tokens_like_prompts(engine, mtp_model):
    kind, e = engine
    text = "<|endoftext|>the sea"
    toks = mtp_model.tokenize(text)
    assert len(toks) == 3 and toks[0] == mtp_model.eos_token_id
    assert len(mtp_model.tokenize(text, parse_special=False)) == 9       # the text of the special token
    c = e.complete(text, max_tokens=4, temp=0)
    assert c.usage.prompt_tokens == len(toks)
    assert e.complete([int(t) for t in toks], max_tokens=4, temp=0).tokens == c.tokens
    assert mtp_model.detokenize(toks) == text


def test_negative_or_invalid_temperature(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 2)
    with pytest.raises(ValueError, match="temp"):
        e.generate(p, temp=-0.1)
    with pytest.raises(ValueError, match="temp"):
        e.generate(p, temp=float("nan"))
    with pytest.raises(TypeError, match="temp"):
        e.generate(p, temp="0")
    assert e.generate(p, max_tokens=2, temp=0.0) == mtp_sm.greedy(p, 2).text


def test_max_tokens_none_and_bounds(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 2)
    w = mtp_sm.words[5]
    c = e.complete(p, max_tokens=None, temp=0, grammar=f'root ::= "{w}"{{3}}')     # until the end of text
    assert (c.text, c.stop_reason) == (w * 3, "eog")
    c = e.complete(p, max_tokens=None, temp=0, stop=mtp_sm.words[9])      # on the greedy cycle
    assert c.stop_reason == "stop_string" and c.text == mtp_sm.greedy(p, 60).text.split(mtp_sm.words[9])[0]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_tokens"):
            e.generate(p, max_tokens=bad)
    with pytest.raises(TypeError, match="max_tokens"):
        e.generate(p, max_tokens=2.0)


@pytest.mark.parametrize("kind", ["session", "mtp"])
def test_timeout_bounds_each_step_and_prompt_timeout_the_prompt(kind, mtp_model, mtp_sm):
    e = (mtp_cy.Session(mtp_model, n_ctx=8192, n_threads=1) if kind == "session"
         else mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=8192, n_threads=1))
    with e:
        long = prompt_of(mtp_sm, 8000)
        # a long prompt with a small per-step timeout does not time out ...
        c = e.complete(long, max_tokens=4, temp=0, timeout=0.1)
        assert c.stop_reason == "max_tokens" and c.tokens == mtp_sm.greedy(long, 4).tokens
        # ... although processing it took longer than that timeout
        assert c.stats["timing_us"]["prefill"] > 100_000, c.stats["timing_us"]
        # prompt_timeout bounds the prompt
        e.clear_cache()
        s = e.stream(long, max_tokens=4, temp=0, prompt_timeout=0.01)
        with pytest.raises(mtp_cy.GenerationTimeout, match="processing the prompt"):
            list(s)
        assert s.completion.stop_reason == "error"
        # timeout bounds each step: a microsecond is too short for any decode
        short = prompt_of(mtp_sm, 3)
        with pytest.raises(mtp_cy.GenerationTimeout):
            e.generate(short, max_tokens=4, temp=0, timeout=1e-6)
        # None / inf: no limit; the session is fine after the timeouts
        assert e.generate(short, max_tokens=4, temp=0, timeout=None, prompt_timeout=float("inf")) == \
            mtp_sm.greedy(short, 4).text
        for bad in (0, -1):
            with pytest.raises(ValueError, match="prompt_timeout"):
                e.generate(short, prompt_timeout=bad)


def _fds():
    return sorted(os.listdir("/proc/self/fd"))


def test_print_stats_does_not_touch_file_descriptors(mtp_model, mtp_sm, capfd, caplog, monkeypatch):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=128, n_threads=1) as m:
        m.generate(prompt_of(mtp_sm, 3), max_tokens=10, temp=0)
        st = m.stats()

        def refuse(*a, **k):
            raise AssertionError("print_stats touched a file descriptor")
        capfd.readouterr()
        before = (_fds(), os.fstat(1), os.fstat(2))
        monkeypatch.setattr(os, "dup", refuse)
        monkeypatch.setattr(os, "dup2", refuse)
        with caplog.at_level(logging.INFO, logger="mtp_cy"):
            line = m.print_stats()
        monkeypatch.undo()
        assert (_fds(), os.fstat(1), os.fstat(2)) == before
        assert capfd.readouterr() == ("", "")          # nothing written to fd 1 or 2
    # upstream's line, then one with the acceptance by draft position
    first, second = line.rstrip("\n").split("\n")
    assert first.startswith("statistics        draft-mtp: #calls(b,g,a) = ") and first.endswith(" ms")
    assert second.startswith("statistics        draft-mtp: acceptance by position = ")
    assert f"#gen tokens = {st['drafts_generated']:6d}" in line
    assert f"#acc tokens = {st['drafts_accepted']:5d}" in line
    rec = [r for r in caplog.records if r.name == "mtp_cy" and "draft-mtp" in r.getMessage()]
    assert len(rec) == 1 and rec[0].levelno == logging.INFO and rec[0].getMessage() == line.rstrip("\n")
