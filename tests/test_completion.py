"""Per-call results (issue #16, part 1): complete(), mtp_cy.Completion, stream.completion.

Exact usage (prompt / cached / completion tokens), this call's statistics against the
cumulative ``stats()`` and the synthetic oracle, ``finish_reason`` / ``stop_reason`` for
every way a call can end, and every kind of stream (sync, events, chat, asyncio)
exposing the same result once it has ended.
"""
import asyncio
import threading

import pytest

import mtp_cy
from conftest import prompt_of

COUNTERS = ("iters", "drafts_generated", "drafts_accepted", "tokens_emitted", "calls", "prompt_tokens",
            "prompt_tokens_cached")
N_CTX = 256


def oracle(kind, sm, prompt, max_tokens, n_ctx=N_CTX):
    if kind == "session":
        return sm.greedy(prompt, max_tokens)
    return sm.predict(prompt, max_tokens, 3, n_ctx=n_ctx)


def same_result(a, b):
    """Two Completions of the same deterministic call agree on everything but timings
    (and the prompt cache's share, which depends on what ran before)."""
    assert (a.text, a.tokens, a.finish_reason, a.stop_reason, a.stop_string) == \
        (b.text, b.tokens, b.finish_reason, b.stop_reason, b.stop_string)
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (b.usage.prompt_tokens, b.usage.completion_tokens)
    assert a.usage.cached_tokens == a.stats["prompt_tokens_cached"]
    for k in ("iters", "drafts_generated", "drafts_accepted", "tokens_emitted", "calls"):
        assert a.stats[k] == b.stats[k], k


def test_complete_text_tokens_usage_and_stats(engine, mtp_sm):
    kind, e = engine
    e.clear_cache()
    p = prompt_of(mtp_sm, 4, 3)
    want = oracle(kind, mtp_sm, p, 12)
    c = e.complete(p, max_tokens=12, temp=0)
    assert isinstance(c, mtp_cy.Completion)
    assert c.text == want.text and c.tokens == want.tokens
    assert (c.finish_reason, c.stop_reason, c.stop_string) == ("length", "max_tokens", None)
    assert c.usage == mtp_cy.Usage(prompt_tokens=4, completion_tokens=12, cached_tokens=0)
    assert c.usage.total_tokens == 16
    assert c.usage.as_dict() == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
    assert c.logprobs is None and c.message is None and c.reasoning is None and c.tool_calls == []
    st = c.stats
    assert (st["iters"], st["drafts_generated"], st["drafts_accepted"], st["tokens_emitted"]) == \
        (want.iters, want.drafts_generated, want.drafts_accepted, want.tokens_emitted)
    assert st["calls"] == 1 and st["prompt_tokens"] == 4 and st["prompt_tokens_cached"] == 0
    assert st["n_draft"] == (0 if kind == "session" else 3)
    assert "policy" not in st and "cache" not in st
    assert set(st["timing_us"]) == {"draft", "verify", "sample", "total", "prefill"}
    assert st["timing_us"]["total"] > 0 and st["tokens_per_sec"] > 0
    if kind == "mtp":
        assert st["acceptance_rate"] == pytest.approx(want.drafts_accepted / want.drafts_generated)
    with pytest.raises(Exception):
        c.text = "x"               # a frozen dataclass


def test_cached_tokens_are_exact(engine, mtp_sm):
    kind, e = engine
    e.clear_cache()
    p = prompt_of(mtp_sm, 5, 1)
    first = e.complete(p, max_tokens=6, temp=0)
    assert first.usage.cached_tokens == 0
    # the same prompt again: everything but its last token (which the first step decodes) is reused
    again = e.complete(p, max_tokens=6, temp=0)
    assert again.usage.cached_tokens == len(p) - 1 == again.stats["prompt_tokens_cached"]
    same = (again.text, again.tokens)
    assert same == (first.text, first.tokens)
    # the prompt followed by the reply: the state already holds all of it but the last generated
    # token (sampled, never decoded) for a Session; MTP's verification may leave one token less
    nxt = p + first.tokens
    c = e.complete(nxt, max_tokens=4, temp=0)
    assert c.usage.prompt_tokens == len(nxt)
    if kind == "session":
        assert c.usage.cached_tokens == len(nxt) - 1
    else:
        assert len(p) - 1 <= c.usage.cached_tokens <= len(nxt) - 1
    assert c.usage.cached_tokens == c.stats["prompt_tokens_cached"]
    assert c.text == oracle(kind, mtp_sm, nxt, 4).text
    # after clear_cache() nothing is reused
    e.clear_cache()
    assert e.complete(nxt, max_tokens=4, temp=0).usage.cached_tokens == 0


def test_per_call_stats_add_up_to_the_cumulative_ones(engine, mtp_sm):
    kind, e = engine
    e.reset_stats()
    calls = [e.complete(prompt_of(mtp_sm, n, n), max_tokens=m, temp=0) for n, m in ((2, 7), (3, 11), (5, 4))]
    calls.append(e.complete(prompt_of(mtp_sm, 5, 5) + calls[-1].tokens, max_tokens=5, temp=0))
    total = e.stats()
    for k in COUNTERS:
        assert sum(c.stats[k] for c in calls) == total[k], k
    for k in ("draft", "verify", "sample", "total", "prefill"):
        assert sum(c.stats["timing_us"][k] for c in calls) == total["timing_us"][k], k
    assert sum(c.usage.completion_tokens for c in calls) == total["tokens_emitted"]
    assert sum(c.usage.cached_tokens for c in calls) == total["prompt_tokens_cached"]


def test_done_event_carries_this_calls_stats(engine, mtp_sm):
    kind, e = engine
    e.complete(prompt_of(mtp_sm, 3), max_tokens=5, temp=0)      # something cumulative before
    p = prompt_of(mtp_sm, 3, 9)
    s = e.stream_events(p, max_tokens=9, temp=0)
    assert s.completion is None and s.finish_reason is None and s.stop_reason is None
    events = list(s)
    kind_, final = events[-1]
    assert kind_ == "done" and final["stop_reason"] == "max_tokens"
    c = s.completion
    assert {k: v for k, v in final.items() if k != "stop_reason"} == c.stats
    assert final["tokens_emitted"] == 9 and final["calls"] == 1
    assert s.completion is c      # computed once


# ------------------------------------------------------------------ every ending

def test_ending_max_tokens_and_stop_string(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 2)
    want = oracle(kind, mtp_sm, p, 10)
    stop = mtp_sm.pieces[want.tokens[5]]
    c = e.complete(p, max_tokens=10, temp=0, stop=[stop, "never-there"])
    assert (c.finish_reason, c.stop_reason, c.stop_string) == ("stop", "stop_string", stop)
    assert c.text == want.text[:want.text.index(stop)] and c.tokens == want.tokens[:5]
    assert c.usage.completion_tokens == 5 == c.stats["tokens_emitted"]


def test_ending_eog_from_a_grammar(engine, mtp_sm):
    """A grammar that is complete after one word leaves only end-of-generation."""
    kind, e = engine
    w = mtp_sm.words[7]
    c = e.complete(prompt_of(mtp_sm, 2), max_tokens=20, temp=0, grammar=f'root ::= "{w}"')
    assert (c.text, c.finish_reason, c.stop_reason) == (w, "stop", "eog")
    assert c.usage.completion_tokens == 1


def test_ending_eog_of_the_model(synthetic):
    sm = synthetic.cached_model(eog_after="sea", seed=3, acceptance=1.0, mtp_head="own")
    with mtp_cy.Model(sm.path) as m:
        p = [sm.eog_after]
        for e in (mtp_cy.Session(m, n_ctx=64, n_threads=1), mtp_cy.MTP(m, n_draft=2, n_ctx=64, n_threads=1)):
            with e:
                c = e.complete(p, max_tokens=30, temp=0)
                assert (c.text, c.tokens, c.finish_reason, c.stop_reason) == ("", [], "stop", "eog")
                q = prompt_of(sm, 2, 4)
                want = sm.greedy(q, 100)
                assert want.stop == "eog"
                c = e.complete(q, max_tokens=100, temp=0)
                assert c.tokens == want.tokens and (c.finish_reason, c.stop_reason) == ("stop", "eog")


@pytest.mark.parametrize("kind", ["session", "mtp"])
def test_ending_ctx_full_with_max_tokens_none(kind, mtp_model, mtp_sm):
    n_ctx = 24
    e = (mtp_cy.Session(mtp_model, n_ctx=n_ctx, n_threads=1) if kind == "session"
         else mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=n_ctx, n_threads=1))
    with e:
        p = prompt_of(mtp_sm, 5)
        c = e.complete(p, max_tokens=None, temp=0)
        assert (c.finish_reason, c.stop_reason) == ("length", "ctx_full")
        assert len(p) + len(c.tokens) == n_ctx + 1
        assert c.tokens == mtp_sm.greedy(p, 100).tokens[:len(c.tokens)]
        if kind == "mtp":
            want = mtp_sm.predict(p, 10 ** 6, 3, n_ctx=n_ctx)
            assert want.stop == "ctx_full" and c.tokens == want.tokens and c.stats["iters"] == want.iters
        # max_tokens=None is the same as no bound at all: the context limit ends it
        assert e.complete(p, max_tokens=10 ** 6, temp=0).tokens == c.tokens


def test_ending_cancelled(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 4)
    s = e.stream_events(p, max_tokens=100, temp=0)
    first = next(s)
    assert first[0] == "token" and s.completion is None
    e.cancel()
    rest = list(s)
    assert rest[-1][0] == "done" and rest[-1][1]["stop_reason"] == "cancelled"
    c = s.completion
    assert (s.finish_reason, s.stop_reason) == ("cancelled", "cancelled")
    assert (c.finish_reason, c.stop_reason) == ("cancelled", "cancelled")
    n = 1 + sum(1 for x in rest if x[0] == "token")
    assert c.tokens == oracle(kind, mtp_sm, p, 100).tokens[:n] and c.usage.completion_tokens == n
    # a stream closed early ends as cancelled too, with what it delivered
    s = e.stream(p, max_tokens=100, temp=0)
    got = [next(s), next(s)]
    s.close()
    assert s.completion.finish_reason == "cancelled" and s.completion.text == "".join(got)
    # cancel() from another thread while complete() runs
    t = threading.Timer(0.05, e.cancel)
    t.start()
    c = e.complete(p, max_tokens=N_CTX - 10, temp=0)
    t.join()
    assert c.stop_reason in ("cancelled", "max_tokens")
    assert c.finish_reason == ("cancelled" if c.stop_reason == "cancelled" else "length")


def test_ending_error_keeps_a_result(engine, mtp_sm):
    kind, e = engine
    e.clear_cache()
    s = e.stream(prompt_of(mtp_sm, 200), max_tokens=5, temp=0, prompt_timeout=1e-6)
    with pytest.raises(mtp_cy.GenerationTimeout):
        list(s)
    c = s.completion
    assert (c.finish_reason, c.stop_reason, c.text, c.tokens) == ("error", "error", "", [])
    assert c.usage.prompt_tokens == 200
    # the session is fine afterwards
    p = prompt_of(mtp_sm, 3)
    assert e.complete(p, max_tokens=3, temp=0).text == oracle(kind, mtp_sm, p, 3).text


# ------------------------------------------------------------------ every stream kind

def test_every_stream_exposes_the_same_result(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 6)
    ref = e.complete(p, max_tokens=8, temp=0)
    for opener in (e.stream, e.stream_events):
        s = opener(p, max_tokens=8, temp=0)
        assert s.completion is None
        out = list(s)
        same_result(s.completion, ref)
        assert s.finish_reason == "length" and s.stop_reason == "max_tokens" and s.tokens_delivered == 8
        if opener == e.stream:
            assert "".join(out) == ref.text
    # with a stop string: the stream and the result agree on the cut text
    stop = mtp_sm.pieces[ref.tokens[4]]
    ref2 = e.complete(p, max_tokens=8, temp=0, stop=stop)
    s = e.stream(p, max_tokens=8, temp=0, stop=stop)
    assert "".join(s) == ref2.text and s.stop_string == stop
    same_result(s.completion, ref2)
    assert e.generate(p, max_tokens=8, temp=0) == ref.text


def test_async_streams_expose_the_same_result(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 11)
    ref = e.complete(p, max_tokens=7, temp=0)

    async def main():
        out = []
        a = e.astream(p, max_tokens=7, temp=0)
        assert a.completion is None and a.finish_reason is None
        async for piece in a:
            out.append(piece)
        b = e.astream_events(p, max_tokens=7, temp=0)
        events = [x async for x in b]
        return out, a, events, b

    out, a, events, b = asyncio.run(main())
    assert "".join(out) == ref.text
    same_result(a.completion, ref)
    same_result(b.completion, ref)
    assert (a.finish_reason, a.stop_reason, a.stop_string) == ("length", "max_tokens", None)
    assert events[-1][0] == "done" and events[-1][1]["tokens_emitted"] == 7


def test_async_stream_cancelled_has_a_result(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 12)

    async def main():
        a = e.astream(p, max_tokens=200, temp=0)
        got = [await a.__anext__()]
        await a.aclose()
        return a, got

    a, got = asyncio.run(main())
    c = a.completion
    assert c.finish_reason == "cancelled" and c.text.startswith(got[0])


def test_chat_streams_and_complete_chat(qwen_chat_engine):
    kind, e, sm = qwen_chat_engine
    msgs = [{"role": "user", "content": "Hi"}]
    ref = e.complete_chat(msgs, max_tokens=6, temp=0, enable_thinking=False)
    assert ref.message == {"role": "assistant", "content": ref.text.strip()}
    s = e.chat(msgs, max_tokens=6, temp=0, enable_thinking=False)
    assert isinstance(s.chat_parser, mtp_cy.ChatParser)
    assert "".join(s) == ref.text
    same_result(s.completion, ref)
    assert s.completion.message == ref.message
    ev = e.chat_events(msgs, max_tokens=6, temp=0, enable_thinking=False)
    list(ev)
    same_result(ev.completion, ref)

    async def main():
        a = e.achat(msgs, max_tokens=6, temp=0, enable_thinking=False)
        return "".join([x async for x in a]), a

    text, a = asyncio.run(main())
    assert text == ref.text and a.completion.message == ref.message
    # plain streams have no parser and no message
    s = e.stream(" the", max_tokens=2, temp=0)
    list(s)
    assert s.chat_parser is None and s.completion.message is None


@pytest.fixture(scope="module", params=["session", "mtp"])
def qwen_chat_engine(request):
    from test_chat import qwen35_jinja
    from mtp_cy import synthetic
    sm = synthetic.cached_model(mtp=True, vocab="qwen35", chat_template=qwen35_jinja())
    with mtp_cy.Model(sm.path) as m:
        e = (mtp_cy.Session(m, n_ctx=512, n_threads=1) if request.param == "session"
             else mtp_cy.MTP(m, n_draft=3, n_ctx=512, n_threads=1))
        with e:
            yield request.param, e, sm
