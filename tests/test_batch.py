"""mtp_cy.Batch: many calls at once, one sequence each, continuous batching.

Every call's greedy text and its own counters (``Completion.stats``) must equal those of the
same call in a lone ``MTP`` session (and the synthetic oracle), whatever else runs beside it,
with more calls than slots; bad input raises; closing, cancelling and abandoning free the slots.
"""
import asyncio
import gc
import threading
import time

import pytest

import mtp_cy
from conftest import counters, expected, prompt_of, rss_bytes

def run_threads(fn, n):
    out, errs = [None] * n, []

    def work(i):
        try:
            out[i] = fn(i)
        except BaseException as exc:      # noqa: BLE001 - reported below
            errs.append(exc)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errs, errs
    return out


def all_free(b):
    return all(r["state"] == "free" for r in b.stats()["slots"])


@pytest.fixture(scope="module")
def batch(mtp_model):
    with mtp_cy.Batch(mtp_model, n_seq=4, n_draft=3, n_ctx=4 * 256, n_threads=1) as b:
        yield b


# ---------------------------------------------------------------------------- exactness
MODELS = {
    "dense": dict(acceptance=0.75),
    "moe": dict(arch="qwen35moe", acceptance=0.75, seed=1),
    "sidecar": dict(layout="sidecar", acceptance=0.75),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_concurrent_calls_equal_lone_mtp_and_oracle(synthetic, kind):
    sm = synthetic.cached_model(**MODELS[kind])
    kw = {"mtp_head": sm.mtp_path} if kind == "sidecar" else {}
    prompts = [prompt_of(sm, 3 + i % 3, start=i) for i in range(7)]      # more calls than slots
    lens = [20 + 7 * i for i in range(7)]
    with mtp_cy.Model(sm.path, **kw) as m:
        with mtp_cy.MTP(m, n_draft=3, n_ctx=256, n_threads=1) as lone:
            ref = [lone.complete(p, max_tokens=n, temp=0) for p, n in zip(prompts, lens)]
        with mtp_cy.Batch(m, n_seq=3, n_draft=3, n_ctx=3 * 256, n_threads=1) as b:
            out = run_threads(lambda i: b.complete(prompts[i], max_tokens=lens[i], temp=0), len(prompts))
            st = b.stats()
            assert all_free(b)
    for i, (r, o) in enumerate(zip(ref, out)):
        assert o.tokens == r.tokens, i
        assert counters(o.stats) == counters(r.stats), i
        assert counters(o.stats) == expected(sm.predict(prompts[i], lens[i], 3, n_ctx=256)), i
    # the steps really served several sequences at once
    assert st["batch"]["mean_size"] > 1.2
    assert st["iters"] == sum(o.stats["iters"] for o in out)
    assert st["drafts_accepted"] == sum(o.stats["drafts_accepted"] for o in out)


def test_per_call_n_draft_and_plain_calls(batch, mtp_model, mtp_sm):
    prompts = [prompt_of(mtp_sm, 4, start=i) for i in range(5)]
    with mtp_cy.Session(mtp_model, n_ctx=256, n_threads=1) as s:
        plain = [s.complete(p, max_tokens=30, temp=0) for p in prompts]
    drafts = [0, 1, 2, 3, 0]
    out = run_threads(lambda i: batch.complete(prompts[i], max_tokens=30, temp=0, n_draft=drafts[i]), 5)
    for i, o in enumerate(out):
        assert o.tokens == plain[i].tokens
        assert counters(o.stats) == expected(mtp_sm.predict(prompts[i], 30, drafts[i], n_ctx=256)) \
            if drafts[i] else o.stats["iters"] == 30
        assert o.stats["n_draft"] == drafts[i]
    assert out[0].stats["drafts_generated"] == 0


def test_auto_is_lossless_and_shows_its_decision(mtp_model, mtp_sm):
    prompts = [prompt_of(mtp_sm, 3, start=i) for i in range(5)]
    with mtp_cy.Session(mtp_model, n_ctx=512, n_threads=1) as s:
        ref = [s.complete(p, max_tokens=80, temp=0).tokens for p in prompts]
    with mtp_cy.Batch(mtp_model, n_seq=4, n_ctx=4 * 512, n_threads=1) as b:
        assert b.n_draft == "auto" and b.n_draft_max == 4
        out = run_threads(lambda i: b.complete(prompts[i], max_tokens=80, temp=0), 5)
        pol = b.stats()["policy"]
    assert [o.tokens for o in out] == ref
    assert set(pol) >= {"k", "reason", "batch_size", "chosen", "verify_us", "acceptance_by_position"}
    assert 0 <= pol["k"] <= 4 and isinstance(pol["reason"], str)
    assert sum(pol["chosen"].values()) == pol["steps"] > 0
    for side in ("longer", "shorter"):
        rm = pol["re_measuring"][side]
        assert rm["runs"] >= 0 and 0.0 <= rm["loss"] <= 1.0
        assert rm["runs"] > 0 or rm["loss"] == 0.0


def test_seeded_sampling_is_the_same_whatever_runs_beside(batch, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    kw = dict(max_tokens=40, temp=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    alone = batch.complete(p, **kw).tokens
    others = [prompt_of(mtp_sm, 4, start=i) for i in range(1, 6)]

    def call(i):
        if i == 0:
            return batch.complete(p, **kw).tokens
        return batch.complete(others[i - 1], max_tokens=30 + i, temp=0.7, seed=i).tokens
    out = run_threads(call, 6)
    assert out[0] == alone


def test_asyncio_gather(batch, mtp_model, mtp_sm):
    prompts = [prompt_of(mtp_sm, 3, start=i) for i in range(6)]
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=256, n_threads=1) as lone:
        ref = [lone.generate(p, max_tokens=25, temp=0) for p in prompts]

    async def main():
        async def one(p):
            return "".join([x async for x in batch.astream(p, max_tokens=25, temp=0)])
        return await asyncio.gather(*(one(p) for p in prompts[:3]),
                                    *(batch.agenerate(p, max_tokens=25, temp=0) for p in prompts[3:]))
    assert asyncio.run(main()) == ref


def test_stop_strings_chat_and_events(batch, mtp_model, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=256, n_threads=1) as lone:
        full = lone.generate(p, max_tokens=40, temp=0)
        stop = full[len(full) // 2:len(full) // 2 + 4]
        ref = lone.complete(p, max_tokens=40, temp=0, stop=stop)
        ref_ev = list(lone.stream_events(p, max_tokens=10, temp=0))
    got = batch.complete(p, max_tokens=40, temp=0, stop=stop)
    assert (got.text, got.finish_reason, got.stop_reason) == (ref.text, ref.finish_reason, ref.stop_reason)
    assert counters(got.stats) == counters(ref.stats)
    ev = list(batch.stream_events(p, max_tokens=10, temp=0))
    assert [e for e in ev if e[0] == "token"] == [e for e in ref_ev if e[0] == "token"]
    assert ev[-1][0] == "done" and counters(ev[-1][1]) == counters(ref_ev[-1][1])
    lp = batch.complete(p, max_tokens=5, temp=0, logprobs=True, top_logprobs=2)
    assert len(lp.logprobs) == 5 and all(x.logprob <= 0 for x in lp.logprobs)


def test_prompt_cache_per_slot(mtp_model, mtp_sm):
    with mtp_cy.Batch(mtp_model, n_seq=2, n_draft=3, n_ctx=2 * 256, n_threads=1) as b:
        a = prompt_of(mtp_sm, 6)
        c1 = b.complete(a, max_tokens=10, temp=0)
        other = b.complete(prompt_of(mtp_sm, 5, start=7), max_tokens=10, temp=0)   # takes the other slot
        c2 = b.complete(list(a) + c1.tokens + prompt_of(mtp_sm, 2, start=3), max_tokens=10, temp=0)
        assert c2.usage.cached_tokens == len(a) + len(c1.tokens) - 1
        assert c2.stats["slot"] == c1.stats["slot"] != other.stats["slot"]
        with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=256, n_threads=1, cache_prompt=False) as lone:
            assert c2.tokens == lone.complete(list(a) + c1.tokens + prompt_of(mtp_sm, 2, start=3),
                                              max_tokens=10, temp=0).tokens
        assert b.stats()["prompt_tokens_cached"] >= c2.usage.cached_tokens
        b.clear_cache()
        assert b.complete(a, max_tokens=3, temp=0).usage.cached_tokens == 0


def test_head_fed_late_after_plain_steps(mtp_model, mtp_sm):
    """A call that may not draft (per-call n_draft=0, or "auto") feeds the MTP head its prompt
    only when it first drafts, and then the last positions only (the plain steps' lag rule):
    a later call on the same slot that drafts, on a prompt longer than that window, is still
    exact and drafts as the oracle says."""
    long = prompt_of(mtp_sm, 60)
    with mtp_cy.Batch(mtp_model, n_seq=2, n_ctx=2 * 512, n_threads=1) as b:
        c1 = b.complete(long, max_tokens=12, temp=0, n_draft=0)
        assert c1.stats["drafts_generated"] == 0
        p2 = list(long) + c1.tokens + prompt_of(mtp_sm, 3, start=5)
        c2 = b.complete(p2, max_tokens=20, temp=0, n_draft=3)
        assert c2.usage.cached_tokens > len(long)
        assert c2.tokens == mtp_sm.greedy(p2, 20).tokens
        assert counters(c2.stats) == expected(mtp_sm.predict(p2, 20, 3, n_ctx=512))
        b.clear_cache()
        c3 = b.complete(long, max_tokens=40, temp=0)               # "auto" from a fresh slot
        assert c3.tokens == mtp_sm.greedy(long, 40).tokens


# ------------------------------------------------------------------- slots and lifetime
def test_calls_wait_for_a_slot_in_order_and_time_out(mtp_model, mtp_sm):
    with mtp_cy.Batch(mtp_model, n_seq=1, n_draft=2, n_ctx=256, n_threads=1) as b:
        it = b.stream(prompt_of(mtp_sm, 3), max_tokens=50, temp=0)
        next(it)                                        # holds the only slot
        t0 = time.monotonic()
        with pytest.raises(mtp_cy.QueueTimeout, match="slot"):
            b.generate(prompt_of(mtp_sm, 3, start=2), max_tokens=5, temp=0, timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 5
        assert b.stats()["batch"]["waiting"] == 0
        order = []

        def later(i):
            time.sleep(0.05 * i)
            s = b.stream(prompt_of(mtp_sm, 3, start=i), max_tokens=3, temp=0)
            next(s)                 # it holds the only slot now: the next waiter cannot start
            order.append(i)
            list(s)
        ts = [threading.Thread(target=later, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        time.sleep(0.4)
        it.close()                                      # frees the slot: the waiters go in arrival order
        for t in ts:
            t.join(30)
        assert order == [0, 1, 2]
        assert all_free(b)


def test_abandoned_iterator_and_cancel_free_the_slot(batch, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    it = batch.stream(p, max_tokens=100, temp=0)
    next(it)
    del it
    gc.collect()
    assert all_free(batch)
    # one call cancelled, the others complete untouched
    ref = batch.complete(prompt_of(mtp_sm, 4, start=1), max_tokens=40, temp=0).tokens
    s = batch.stream_events(p, max_tokens=200, temp=0)
    next(s)

    def other(_):
        return batch.complete(prompt_of(mtp_sm, 4, start=1), max_tokens=40, temp=0).tokens
    th = threading.Thread(target=lambda: (time.sleep(0.05), s._cancel()))
    th.start()
    out = run_threads(other, 2)
    th.join()
    ev = list(s)
    assert ev[-1][0] == "done" and ev[-1][1]["stop_reason"] == "cancelled"
    assert out == [ref, ref]
    assert all_free(batch)


def test_cancel_all(mtp_model, mtp_sm):
    with mtp_cy.Batch(mtp_model, n_seq=2, n_draft=2, n_ctx=2 * 2048, n_threads=1) as b:
        its = [b.stream(prompt_of(mtp_sm, 3, start=i), max_tokens=1500, temp=0) for i in range(3)]
        res = []

        def drain(it):
            list(it)
            res.append(it.finish_reason)
        ts = [threading.Thread(target=drain, args=(it,)) for it in its]
        for t in ts:
            t.start()
        time.sleep(0.3)
        b.cancel()
        for t in ts:
            t.join(30)
        assert sorted(res) == ["cancelled"] * 3
        assert all_free(b)
        assert b.generate(prompt_of(mtp_sm, 3), max_tokens=3, temp=0)   # usable afterwards


def test_close_with_calls_in_flight(mtp_model, mtp_sm):
    b = mtp_cy.Batch(mtp_model, n_seq=2, n_draft=2, n_ctx=2 * 2048, n_threads=1)
    errs = []

    def call(i):
        try:
            b.generate(prompt_of(mtp_sm, 3, start=i), max_tokens=1500, temp=0)
            errs.append(None)
        except mtp_cy.ClosedError as exc:
            errs.append(exc)
    ts = [threading.Thread(target=call, args=(i,)) for i in range(4)]    # two wait for a slot
    for t in ts:
        t.start()
    time.sleep(0.3)
    b.close()
    for t in ts:
        t.join(30)
    assert len(errs) == 4 and all(isinstance(e, mtp_cy.ClosedError) for e in errs)
    b.close()
    assert b.closed
    with pytest.raises(mtp_cy.ClosedError):
        b.generate("x")


def test_bad_input(mtp_model, plain_model, mtp_sm):
    for n in (0, 65, "4", 2.0):
        with pytest.raises((ValueError, TypeError), match="n_seq"):
            mtp_cy.Batch(mtp_model, n_seq=n)
    with pytest.raises(ValueError, match="n_ctx"):
        mtp_cy.Batch(mtp_model, n_seq=8, n_ctx=64)
    for nd in (-1, 65, "fast", True):
        with pytest.raises(ValueError, match="n_draft"):
            mtp_cy.Batch(mtp_model, n_draft=nd)
    with pytest.raises(TypeError, match="unexpected keyword"):
        mtp_cy.Batch(mtp_model, n_sequences=2)
    with mtp_cy.Batch(mtp_model, n_seq=2, n_draft=2, n_ctx=2 * 64, n_threads=1) as b:
        with pytest.raises(ValueError, match="n_ctx"):
            b.generate(prompt_of(mtp_sm, 64), max_tokens=2)
        with pytest.raises(ValueError, match="n_draft"):
            b.generate(prompt_of(mtp_sm, 3), n_draft=3)
        with pytest.raises(TypeError):
            b.generate(prompt_of(mtp_sm, 3), bogus=1)
        assert b.generate(prompt_of(mtp_sm, 3), max_tokens=3, temp=0)          # still usable
        # a context that fills ends the call with "length" / ctx_full, the others go on
        c = b.complete(prompt_of(mtp_sm, 3), max_tokens=None, temp=0)
        assert c.stop_reason in ("ctx_full", "eog") and c.usage.completion_tokens <= 64
    # a per-call n_draft on an MTP / Session: at most the engine's longest draft
    with mtp_cy.MTP(mtp_model, n_draft=2, n_ctx=128, n_threads=1) as m:
        with pytest.raises(ValueError, match=r"\[0, 2\]"):
            m.generate(prompt_of(mtp_sm, 3), n_draft=3)
        assert m.generate(prompt_of(mtp_sm, 3), max_tokens=2, temp=0)
    with mtp_cy.Session(mtp_model, n_ctx=128, n_threads=1) as s:
        with pytest.raises(ValueError, match="only 0"):
            s.generate(prompt_of(mtp_sm, 3), n_draft=1)
        assert s.generate(prompt_of(mtp_sm, 3), max_tokens=2, temp=0, n_draft=0)
    # a model without an MTP head batches plain steps; asking it to draft raises
    with pytest.raises(mtp_cy.MTPUnsupportedError, match="n_draft=0"):
        mtp_cy.Batch(plain_model, n_draft=3)
    with mtp_cy.Batch(plain_model, n_seq=2, n_ctx=256, n_threads=1) as b:
        assert b.n_draft_max == 0
        with mtp_cy.Session(plain_model, n_ctx=128, n_threads=1) as s:
            p = prompt_of(mtp_sm, 3)
            assert b.generate(p, max_tokens=10, temp=0) == s.generate(p, max_tokens=10, temp=0)


def test_stats_rows_and_print(batch, mtp_sm):
    batch.generate(prompt_of(mtp_sm, 3), max_tokens=5, temp=0)
    st = batch.stats()
    assert st["n_seq"] == 4 and len(st["slots"]) == 4
    assert {"size", "steps", "mean_size", "waiting"} <= set(st["batch"])
    assert {"slot", "state", "cached_tokens"} <= set(st["slots"][0])
    assert "batch steps" in batch.print_stats()
    assert "Batch" in repr(batch)


def test_no_leak_across_many_calls(batch, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    for _ in range(30):
        batch.generate(p, max_tokens=4, temp=0)
    gc.collect()
    r0 = rss_bytes()
    for i in range(300):
        it = batch.stream(p, max_tokens=4, temp=0)
        if i % 3:
            list(it)
        else:
            next(it)
            del it
    gc.collect()
    assert rss_bytes() - r0 < 20 * 1024 * 1024
    assert all_free(batch)


def test_cache_ram_keeps_evicted_conversations(mtp_model, mtp_sm):
    """Two conversations alternating on one slot: the one that was evicted comes back from
    host memory (its history not processed again) and its continuation is exact."""
    a, b = prompt_of(mtp_sm, 6), prompt_of(mtp_sm, 6, start=5)
    more = prompt_of(mtp_sm, 2, start=9)
    for cache_ram, reused in ((1 << 30, True), (0, False), (16, False)):
        with mtp_cy.Batch(mtp_model, n_seq=1, n_draft=3, n_ctx=512, n_threads=1, cache_ram=cache_ram) as bt:
            ra = bt.complete(a, max_tokens=12, temp=0)
            rb = bt.complete(b, max_tokens=12, temp=0)         # evicts conversation a from the slot
            c = bt.complete(list(a) + ra.tokens + more, max_tokens=12, temp=0)
            st = bt.stats()["cache"]
            assert (c.usage.cached_tokens == len(a) + len(ra.tokens) - 1) == reused, cache_ram
            assert st["cache_ram"] == cache_ram
            if reused:
                assert st["host_hits"] == 1 and st["host_states"] == 1 and st["host_bytes"] > 0   # b's copy
                d = bt.complete(list(b) + rb.tokens + more, max_tokens=12, temp=0)
                assert d.usage.cached_tokens == len(b) + len(rb.tokens) - 1
                bt.clear_cache()
                assert bt.stats()["cache"]["host_states"] == 0
            else:
                assert st["host_states"] == 0
        with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=512, n_threads=1, cache_prompt=False) as lone:
            ref = lone.complete(list(a) + ra.tokens + more, max_tokens=12, temp=0)
        assert c.tokens == ref.tokens and counters(c.stats) == counters(ref.stats)
    with pytest.raises(ValueError, match="cache_ram"):
        mtp_cy.Batch(mtp_model, cache_ram=-1)


def test_one_call_timing_out_does_not_disturb_the_others(batch, mtp_model, mtp_sm):
    prompts = [prompt_of(mtp_sm, 3, start=i) for i in range(4)]
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=256, n_threads=1) as lone:
        ref = [lone.complete(p, max_tokens=60, temp=0).tokens for p in prompts]

    def call(i):
        if i == 0:
            try:
                batch.generate(prompts[0], max_tokens=200, temp=0, timeout=1e-6)
            except mtp_cy.GenerationTimeout:
                return "timeout"
            return "no timeout"
        return batch.complete(prompts[i], max_tokens=60, temp=0).tokens
    out = run_threads(call, 4)
    assert out[0] == "timeout"
    assert out[1:] == ref[1:]
    assert all_free(batch)


def test_chat_and_openai_shapes_concurrently(mtp_model):
    msgs = [[{"role": "user", "content": f"hello {i}"}] for i in range(4)]
    with mtp_cy.Batch(mtp_model, n_seq=2, n_draft=2, n_ctx=2 * 512, n_threads=1) as b, \
            mtp_cy.MTP(mtp_model, n_draft=2, n_ctx=512, n_threads=1) as lone:
        ref = [lone.complete_chat(m, template="chatml", max_tokens=12, temp=0).text for m in msgs]
        out = run_threads(lambda i: b.complete_chat(msgs[i], template="chatml", max_tokens=12, temp=0).text, 4)
        assert out == ref
        oa = run_threads(lambda i: b.create_completion("the sea", max_tokens=5, temperature=0), 3)
        assert all(o["object"] == "text_completion" and o["usage"]["completion_tokens"] == 5 for o in oa)
        chunks = list(b.create_chat_completion(msgs[0], max_tokens=4, temperature=0, stream=True,
                                               template="chatml", n_draft=0))
        assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_many_more_async_calls_than_slots_and_workers(mtp_model, mtp_sm):
    """More waiting async calls than the async worker pool has threads: the calls that hold the
    slots still get workers for their next steps (an opening step, which may wait for a slot,
    runs in a thread of its own)."""
    from mtp_cy import _aio
    n = _aio._pool()._max_workers + 8
    prompts = [prompt_of(mtp_sm, 3, start=i % 7) for i in range(n)]
    with mtp_cy.Batch(mtp_model, n_seq=2, n_draft=2, n_ctx=2 * 128, n_threads=1) as b:
        want = {tuple(p): b.generate(p, max_tokens=4, temp=0) for p in prompts[:7]}

        async def one(p):
            return "".join([x async for x in b.astream(p, max_tokens=4, temp=0, timeout=30)])

        async def main():
            return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)
        out = asyncio.run(main())
        assert out == [want[tuple(p)] for p in prompts]
        assert all_free(b)


def test_auto_lone_call_is_decided_by_the_one_sequence_policy(mtp_model, mtp_sm):
    """A call alone on a Batch(n_draft="auto") is decided as a lone MTP(n_draft="auto") decides
    it (its steps are the one-sequence policy's, not the batch policy's); text exact."""
    p = prompt_of(mtp_sm, 4)
    with mtp_cy.Session(mtp_model, n_ctx=512, n_threads=1) as s:
        ref = s.complete(p, max_tokens=60, temp=0).tokens
    with mtp_cy.Batch(mtp_model, n_seq=2, n_ctx=2 * 512, n_threads=1) as b:
        c = b.complete(p, max_tokens=60, temp=0)
        assert c.tokens == ref
        pol = b.stats()["policy"]
        assert pol["single"]["iterations"] == c.stats["iters"] == sum(pol["single"]["chosen"].values())
        assert pol["steps"] == 0                  # no step of several sequences yet
        b.reset_policy()
        assert b.stats()["policy"]["single"]["iterations"] == 0
