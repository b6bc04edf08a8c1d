"""Prompt cache (issue #14): a call that reuses the session's state produces exactly the
tokens -- and for MTP the counters -- of the same call on a fresh session.

The synthetic models are hybrid (Gated-DeltaNet + attention, like Qwen3.5/3.6), so a
reuse that is not at the very end of the state goes through a state checkpoint."""
import asyncio
import threading

import pytest

import mtp_cy
from conftest import make_engine, prompt_of

COUNTERS = ("iters", "drafts_generated", "drafts_accepted", "tokens_emitted")
KINDS = ["session", "mtp", "batch"]


def make(kind, model, **kw):
    kw.setdefault("n_ctx", 512)
    return make_engine(kind, model, **kw)


def run(engine, prompt, **opts):
    """(tokens, counters of this call, prompt tokens reused) of one call."""
    opts.setdefault("temp", 0)
    before = engine.stats()
    events = list(engine.stream_events(prompt, **opts))
    after = engine.stats()
    toks = [e[1] for e in events if e[0] == "token"]
    return (toks, {k: after[k] - before[k] for k in COUNTERS},
            after["prompt_tokens_cached"] - before["prompt_tokens_cached"])


def fresh(kind, model, prompt, engine_kw=None, **opts):
    with make(kind, model, **(engine_kw or {})) as e:
        toks, cnt, cached = run(e, prompt, **opts)
        assert cached == 0
        return toks, cnt


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def tokens_of(engine, toks):
    return list(toks)


# ------------------------------------------------------------------ the cases that break caches

def test_prompt_extends_the_last_one(kind, mtp_model, mtp_sm):
    with make(kind, mtp_model) as e:
        p1 = prompt_of(mtp_sm, 5)
        g1, _, c1 = run(e, p1, max_tokens=20)
        assert c1 == 0
        # the next prompt: the previous prompt, its reply and more text
        p2 = p1 + g1 + prompt_of(mtp_sm, 4, start=7)
        g2, cnt2, c2 = run(e, p2, max_tokens=20)
        assert (g2, cnt2) == fresh(kind, mtp_model, p2, max_tokens=20)
        # everything the state held was reused: the prompt and all but the last generated token
        assert c2 == len(p1) + len(g1) - 1
        assert e.stats()["cache"]["tokens"] > len(p2)


@pytest.mark.parametrize("where", [1, 3, 9, 15])
def test_prompt_diverges_inside_the_previous_prompt(kind, mtp_model, mtp_sm, where):
    with make(kind, mtp_model, checkpoint_every=4) as e:
        p1 = prompt_of(mtp_sm, 16)
        run(e, p1, max_tokens=8)
        p2 = p1[:where] + prompt_of(mtp_sm, 6, start=30)
        g2, cnt2, c2 = run(e, p2, max_tokens=12)
        assert (g2, cnt2) == fresh(kind, mtp_model, p2, max_tokens=12)
        # hybrid memory: back to the latest checkpoint at or before the difference
        # (one every 4 prompt tokens, and one at the end of the prompt minus its last token)
        assert c2 == max([c for c in (4, 8, 12, 15) if c <= where], default=0)


def test_prompt_diverges_inside_the_generated_part(kind, mtp_model, mtp_sm):
    with make(kind, mtp_model) as e:
        p1 = prompt_of(mtp_sm, 6)
        g1, _, _ = run(e, p1, max_tokens=12)
        p2 = p1 + g1[:5] + prompt_of(mtp_sm, 3, start=40)
        g2, cnt2, c2 = run(e, p2, max_tokens=10)
        assert (g2, cnt2) == fresh(kind, mtp_model, p2, max_tokens=10)
        assert c2 == len(p1) - 1          # the checkpoint at the end of the first prompt


def test_shorter_and_identical_prompts(kind, mtp_model, mtp_sm):
    with make(kind, mtp_model) as e:
        p1 = prompt_of(mtp_sm, 10)
        first = run(e, p1, max_tokens=10)
        # identical: the last prompt token is always processed again (its logits are not kept)
        again = run(e, p1, max_tokens=10)
        assert again[:2] == first[:2] and again[2] == len(p1) - 1
        shorter = p1[:6]
        g, cnt, c = run(e, shorter, max_tokens=10)
        assert (g, cnt) == fresh(kind, mtp_model, shorter, max_tokens=10)
        # p1 left checkpoints at 9 (its end) only: nothing at or before 5
        assert c == 0
        g, cnt, c = run(e, p1, max_tokens=10)
        assert (g, cnt) == first[:2]


def test_many_calls_in_a_row_match_fresh_sessions(kind, mtp_model, mtp_sm):
    with make(kind, mtp_model, checkpoint_every=8) as e:
        prompts = [prompt_of(mtp_sm, 12), prompt_of(mtp_sm, 20), prompt_of(mtp_sm, 7, start=3),
                   prompt_of(mtp_sm, 20), prompt_of(mtp_sm, 33), prompt_of(mtp_sm, 2), prompt_of(mtp_sm, 33)]
        reused = 0
        for p in prompts:
            g, cnt, c = run(e, p, max_tokens=9)
            assert (g, cnt) == fresh(kind, mtp_model, p, max_tokens=9), p
            reused += c
        assert reused > 0


def test_seeded_sampling_is_exact_with_reuse(kind, mtp_model, mtp_sm):
    opts = dict(max_tokens=25, temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=77)
    with make(kind, mtp_model) as e:
        p1 = prompt_of(mtp_sm, 8)
        g1, _, _ = run(e, p1, **opts)
        for p in (p1, p1 + g1 + prompt_of(mtp_sm, 3), p1[:5] + prompt_of(mtp_sm, 2, start=9)):
            g, cnt, _ = run(e, p, **opts)
            assert (g, cnt) == fresh(kind, mtp_model, p, **opts)


def test_multi_turn_chat_through_the_template(kind):
    from test_chat import qwen35_jinja
    from mtp_cy import synthetic as synth
    sm = synth.cached_model(mtp=True, vocab="qwen35", chat_template=qwen35_jinja())
    with mtp_cy.Model(sm.path) as model, make(kind, model, n_ctx=2048) as e:
        conv = [{"role": "system", "content": "Be brief."}]
        cached, prompts = [], []
        for turn in range(4):
            conv.append({"role": "user", "content": f"question {turn}:" + sm.words[turn] * 3})
            prompts.append(list(model.tokenize(model.apply_chat_template(conv), parse_special=True)))
            before = e.stats()
            reply = "".join(e.chat(conv, max_tokens=12, temp=0))
            cached.append(e.stats()["prompt_tokens_cached"] - before["prompt_tokens_cached"])
            with make(kind, model, n_ctx=2048) as f:
                assert f.generate(e.model.apply_chat_template(conv), max_tokens=12, temp=0) == reply
                assert f.stats()["iters"] == e.stats()["iters"] - before["iters"]
                assert f.stats()["drafts_accepted"] == e.stats()["drafts_accepted"] - before["drafts_accepted"]
            conv.append({"role": "assistant", "content": reply})
        # every turn reuses the whole history before it, up to where the two prompts part (the
        # checkpoint chat() leaves there: Qwen3.5's generation prompt opens a <think> block
        # that the history does not keep)
        def common(a, b):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n
        want = [0] + [common(prompts[t - 1], prompts[t]) for t in range(1, 4)]
        assert cached == want and all(w > 20 for w in want[1:]), (cached, want)


# ------------------------------------------------------------------ after calls that ended early

def test_after_a_stop_string(kind, mtp_model, mtp_sm):
    with make(kind, mtp_model) as e:
        p1 = prompt_of(mtp_sm, 6)
        want = mtp_sm.greedy(p1, 10)
        stop = mtp_sm.words[mtp_sm.token_ids.index(want.tokens[4])]
        text = e.generate(p1, max_tokens=10, temp=0, stop=stop)
        assert text == mtp_sm.decode(want.tokens[:4])
        p2 = p1 + want.tokens[:4] + prompt_of(mtp_sm, 2, start=11)
        g, cnt, c = run(e, p2, max_tokens=8)
        assert (g, cnt) == fresh(kind, mtp_model, p2, max_tokens=8)


@pytest.mark.parametrize("how", ["cancel", "timeout", "abandon", "error", "interrupt"])
def test_after_a_call_that_ended_early(kind, mtp_model, mtp_sm, how):
    with make(kind, mtp_model, n_ctx=4096, n_threads=1) as e:
        p1 = prompt_of(mtp_sm, 3000)
        if how == "cancel":
            threading.Timer(0.05, e.cancel).start()
            e.generate(p1, max_tokens=50, temp=0)
        elif how == "timeout":
            with pytest.raises(mtp_cy.GenerationTimeout):
                e.generate(p1, max_tokens=50, temp=0, prompt_timeout=0.02)
        elif how == "abandon":
            it = e.stream(prompt_of(mtp_sm, 8), max_tokens=50, temp=0)
            next(it), next(it)
            it.close()
        elif how == "error":
            with pytest.raises(mtp_cy.NativeError):
                e.generate(prompt_of(mtp_sm, 8), max_tokens=8, grammar='root ::= "\\x00"')
        else:
            import _thread
            t = threading.Timer(0.05, _thread.interrupt_main)
            t.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    e.generate(p1, max_tokens=50, temp=0)
            finally:
                t.cancel()
                t.join()
        for p in (prompt_of(mtp_sm, 8), prompt_of(mtp_sm, 8) + prompt_of(mtp_sm, 4, start=20)):
            g, cnt, _ = run(e, p, max_tokens=10)
            assert (g, cnt) == fresh(kind, mtp_model, p, max_tokens=10)


def test_async_cancel_then_reuse(kind, mtp_model, mtp_sm):
    async def main(e):
        task = asyncio.create_task(e.agenerate(prompt_of(mtp_sm, 3000), max_tokens=20, temp=0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await e.agenerate(prompt_of(mtp_sm, 9), max_tokens=10, temp=0)

    with make(kind, mtp_model, n_ctx=4096, n_threads=1) as e:
        text = asyncio.run(main(e))
    assert text == mtp_sm.greedy(prompt_of(mtp_sm, 9), 10).text


# ------------------------------------------------------------------ limits and options

def test_context_nearly_full(kind, mtp_model, mtp_sm):
    with make(kind, mtp_model, n_ctx=40) as e:
        p1 = prompt_of(mtp_sm, 30)
        g1, _, _ = run(e, p1, max_tokens=100)
        assert len(p1) + len(g1) == 41          # the context filled up
        for p in (p1 + g1[:8], p1[:38], p1 + g1[:9]):
            p = p[:39]
            g, cnt, _ = run(e, p, max_tokens=100)
            assert (g, cnt) == fresh(kind, mtp_model, p, engine_kw=dict(n_ctx=40), max_tokens=100)


def test_cache_prompt_false_and_clear_cache(kind, mtp_model, mtp_sm):
    p = prompt_of(mtp_sm, 10)
    with make(kind, mtp_model, cache_prompt=False) as e:
        run(e, p, max_tokens=5)
        assert run(e, p, max_tokens=5)[2] == 0
        assert e.stats()["cache"]["checkpoints"] == 0
    with make(kind, mtp_model) as e:
        run(e, p, max_tokens=5)
        st = e.stats()["cache"]
        assert st["checkpoints"] == 1 and st["checkpoint_bytes"] > 0 and st["tokens"] > 0
        e.clear_cache()
        st = e.stats()["cache"]
        assert {k: st[k] for k in ("tokens", "checkpoints", "checkpoint_bytes")} == \
            {"tokens": 0, "checkpoints": 0, "checkpoint_bytes": 0}
        assert run(e, p, max_tokens=5)[2] == 0
        it = e.stream(p, max_tokens=5)
        next(it)
        if kind == "batch":
            e.clear_cache()       # a Batch clears its free slots; the running call keeps its own
            assert list(it) is not None and it.finish_reason == "length"
        else:
            with pytest.raises(mtp_cy.SessionBusyError):
                e.clear_cache()
        it.close()


def test_checkpoints_are_bounded(kind, mtp_model, mtp_sm):
    with make(kind, mtp_model, n_ctx=1024, checkpoint_every=16, cache_checkpoints=3) as e:
        run(e, prompt_of(mtp_sm, 200), max_tokens=2)
        st = e.stats()["cache"]
        assert st["checkpoints"] == 3
        # the kept ones are the latest: a prompt diverging early finds none
        g, cnt, c = run(e, prompt_of(mtp_sm, 40) + prompt_of(mtp_sm, 3, start=5), max_tokens=5)
        assert c == 0
    with make(kind, mtp_model, cache_checkpoints=0) as e:
        p = prompt_of(mtp_sm, 10)
        run(e, p, max_tokens=5)
        assert e.stats()["cache"]["checkpoints"] == 0
        # without checkpoints only the end of the state can be reused
        assert run(e, p, max_tokens=5)[2] == 0
