"""timeout=, cancel() and asyncio cancellation reach into the grammar's work (vendor/patches/0002).

A JSON schema with a large enum on a 151,936-token vocabulary makes one sampling step take
seconds (the grammar judges every candidate token against every enum entry), all of it outside
any ggml graph, where llama.cpp's abort callback used to be the only check.  The time of one
uninterrupted step is measured first; every interruption must then take effect in a small
fraction of it, and leave the session usable.
"""
import asyncio
import threading
import time

import pytest

import mtp_cy
from conftest import make_engine


@pytest.fixture(scope="module")
def big_vocab():
    from mtp_cy import synthetic
    sm = synthetic.cached_model(mtp=True, acceptance=0.75, vocab="qwen35")
    m = mtp_cy.Model(sm.path)
    yield sm, m
    m.close()


def enum_schema(n):
    # at the top level: the slow part (every entry alive after the opening quote) starts
    # with the second token
    return {"enum": [f"w{i}x{i * 7 % 13}" for i in range(n)]}


SCHEMA = enum_schema(1500)


@pytest.fixture(scope="module")
def full_step(big_vocab):
    """Seconds of the first constrained tokens without any limit (a slow grammar step)."""
    sm, m = big_vocab
    with mtp_cy.Session(m, n_ctx=256, n_threads=1) as s:
        t0 = time.perf_counter()
        s.generate(sm.token_ids[:3], json_schema=SCHEMA, max_tokens=3, temp=0, timeout=None)
        took = time.perf_counter() - t0
    if took < 0.5:
        pytest.skip(f"this machine runs the slow grammar in {took:.2f} s: nothing to interrupt")
    return took


@pytest.mark.parametrize("kind", ["session", "mtp", "batch"])
def test_timeout_inside_the_grammar(big_vocab, full_step, kind):
    sm, m = big_vocab
    with make_engine(kind, m, n_draft=2, n_ctx=256, n_threads=1) as eng:
        limit = full_step / 20
        t0 = time.perf_counter()
        with pytest.raises(mtp_cy.GenerationTimeout):
            eng.generate(sm.token_ids[:3], json_schema=SCHEMA, max_tokens=3, temp=0, timeout=limit)
        assert time.perf_counter() - t0 < full_step / 2
        # usable again, with the same grammar too
        assert eng.generate(sm.token_ids[:3], max_tokens=3, temp=0) == sm.greedy(sm.token_ids[:3], 3).text
        assert eng.generate(sm.token_ids[:3], json_schema={"type": "integer"}, max_tokens=2, temp=0) is not None


@pytest.mark.parametrize("kind", ["mtp", "batch"])
def test_timeout_inside_the_grammar_when_sampling(big_vocab, full_step, kind):
    """Rejection sampling (the default when sampling) runs the grammar over the draft's and the
    target's candidates itself: a timeout stops that work too."""
    sm, m = big_vocab
    with make_engine(kind, m, n_draft=2, n_ctx=256, n_threads=1) as eng:
        limit = full_step / 20
        t0 = time.perf_counter()
        with pytest.raises(mtp_cy.GenerationTimeout):
            eng.generate(sm.token_ids[:3], json_schema=SCHEMA, max_tokens=3, temp=0.8, top_k=0, top_p=1.0,
                         min_p=0.0, seed=1, timeout=limit)
        assert time.perf_counter() - t0 < full_step / 2
        c = eng.complete(sm.token_ids[:3], json_schema={"type": "integer"}, max_tokens=4, temp=0.8, seed=2)
        assert c.stats["spec_sampling"] == "rejection" and (c.text == "" or c.text.strip().lstrip("-").isdigit())
        assert eng.generate(sm.token_ids[:3], max_tokens=3, temp=0) == sm.greedy(sm.token_ids[:3], 3).text


@pytest.mark.parametrize("kind", ["session", "mtp"])
def test_cancel_inside_the_grammar(big_vocab, full_step, kind):
    sm, m = big_vocab
    with make_engine(kind, m, n_draft=2, n_ctx=256, n_threads=1) as eng:
        timer = threading.Timer(full_step / 20, eng.cancel)
        it = eng.stream_events(sm.token_ids[:3], json_schema=SCHEMA, max_tokens=3, temp=0, timeout=None)
        t0 = time.perf_counter()
        timer.start()
        events = list(it)
        took = time.perf_counter() - t0
        timer.join()
        assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "cancelled"
        assert took < full_step / 2
        assert eng.generate(sm.token_ids[:3], max_tokens=3, temp=0) == sm.greedy(sm.token_ids[:3], 3).text


def test_asyncio_cancel_inside_the_grammar(big_vocab, full_step):
    sm, m = big_vocab

    async def main(s):
        task = asyncio.ensure_future(s.agenerate(sm.token_ids[:3], json_schema=SCHEMA, max_tokens=3, temp=0,
                                                 timeout=None))
        await asyncio.sleep(full_step / 20)
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - t0

    with mtp_cy.Session(m, n_ctx=256, n_threads=1) as s:
        assert asyncio.run(main(s)) < full_step / 2
        assert s.generate(sm.token_ids[:3], max_tokens=3, temp=0) == sm.greedy(sm.token_ids[:3], 3).text
