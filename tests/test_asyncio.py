"""asyncio: astream / astream_events / agenerate / achat on Session and MTP.

No pytest-asyncio: every test drives its own loop with ``asyncio.run``.
"""
import asyncio
import time

import pytest

import mtp_cy
from conftest import make_engine, prompt_of

N_DRAFT = 3


def make(kind, model, **kw):
    kw.setdefault("n_threads", 1)
    return make_engine(kind, model, n_draft=N_DRAFT, **kw)


def want_of(kind, sm, p, max_tokens, n_ctx):
    if kind == "session":
        return sm.greedy(p, max_tokens)
    return sm.predict(p, max_tokens, N_DRAFT, n_ctx=n_ctx)


@pytest.fixture(scope="module", params=["session", "mtp"])
def engine(request, mtp_model):
    e = make(request.param, mtp_model, n_ctx=4096)
    yield request.param, e
    e.close()


def run(coro):
    return asyncio.run(coro)


async def alist(ait):
    return [x async for x in ait]


def test_async_results_equal_sync_results(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3)
    want = want_of(kind, mtp_sm, p, 20, 4096)

    async def main():
        pieces = await alist(e.astream(p, max_tokens=20, temp=0))
        events = await alist(e.astream_events(p, max_tokens=20, temp=0, emit_stats_every=7))
        text = await e.agenerate(p, max_tokens=20, temp=0)
        return pieces, events, text

    e.reset_stats()
    pieces, events, text = run(main())
    assert pieces == [mtp_sm.pieces[t] for t in want.tokens]
    assert text == want.text
    assert [x[1] for x in events if x[0] == "token"] == want.tokens
    assert [x[0] for x in events].count("stats") == 2
    assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "max_tokens"
    st = e.stats()
    assert st["tokens_emitted"] == 60 and st["calls"] == 3
    if kind == "mtp":
        assert st["iters"] == 3 * want.iters and st["drafts_accepted"] == 3 * want.drafts_accepted
    sync_events = list(e.stream_events(p, max_tokens=20, temp=0, emit_stats_every=7))
    assert [x for x in events if x[0] == "token"] == [x for x in sync_events if x[0] == "token"]


def test_async_stop_strings(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 4)
    want = want_of(kind, mtp_sm, p, 20, 4096)
    stop = want.text[30:34]
    cut = want.text[:want.text.find(stop)]

    async def main():
        it = e.astream(p, max_tokens=20, temp=0, stop=[stop, "never#"])
        assert it.finish_reason is None
        pieces = await alist(it)
        events = await alist(e.astream_events(p, max_tokens=20, temp=0, stop=stop))
        return it, pieces, events, await e.agenerate(p, max_tokens=20, temp=0, stop=stop)

    it, pieces, events, text = run(main())
    assert "".join(pieces) == cut == text
    assert it.finish_reason == "stop" and it.stop_string == stop
    assert events[-1] == ("stop", stop)
    assert "".join(x[2] for x in events if x[0] == "token") == cut


def test_achat(mtp_model, synthetic):
    sm = synthetic.cached_model(mtp=True, vocab="qwen35")       # keeps the vocabulary's ChatML template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with mtp_cy.Model(sm.path) as model:
        for kind in ("session", "mtp"):
            with make(kind, model, n_ctx=256) as e:
                sync = "".join(e.chat(msgs, max_tokens=8, temp=0))
                toks = list(model.tokenize(model.apply_chat_template(msgs), parse_special=True))
                assert sync == want_of(kind, sm, toks, 8, 256).text

                async def main():
                    pieces = await alist(e.achat(msgs, max_tokens=8, temp=0))
                    events = await alist(e.achat_events(msgs, max_tokens=8, temp=0))
                    with pytest.raises(ValueError, match=r"messages\[1\]"):
                        await alist(e.achat([msgs[0], {"content": "x"}], max_tokens=8))
                    return pieces, events

                pieces, events = run(main())
                assert "".join(pieces) == sync
                assert "".join(x[2] for x in events if x[0] == "token") == sync
                assert events[-1][0] == "done"


@pytest.mark.parametrize("kind", ["session", "mtp"])
def test_event_loop_keeps_ticking_during_native_work(kind, mtp_model, mtp_sm):
    """A ~4000-token prefill runs in the worker thread: another coroutine on the same loop
    keeps ticking at its normal rate."""
    # no prompt cache: the second call must process the whole prompt again
    e = make(kind, mtp_model, n_ctx=4096, n_batch=4096, cache_prompt=False)
    long_prompt = prompt_of(mtp_sm, 4000)

    async def main():
        gaps, done = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        gaps.clear()
        t0 = time.perf_counter()
        text = await e.agenerate(long_prompt, max_tokens=2, temp=0)
        dt = time.perf_counter() - t0
        done.set()
        await t
        return text, gaps, dt

    try:
        text, gaps, dt = run(main())
    finally:
        e.close()
    assert text == want_of(kind, mtp_sm, long_prompt, 2, 4096).text
    assert dt > 0.05, "prefill too short to tell"
    assert max(gaps) < max(0.25 * dt, 0.03), (max(gaps), dt)
    assert len(gaps) >= 0.2 * dt / 0.002, (len(gaps), dt)   # ticks at (roughly) its normal rate


def test_cancel_mid_stream_then_reuse(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3)
    want = want_of(kind, mtp_sm, p, 3000, 4096)

    async def main():
        got, five = [], asyncio.Event()

        async def consume():
            async for piece in e.astream(p, max_tokens=3000, temp=0):
                got.append(piece)
                if len(got) == 5:
                    five.set()

        task = asyncio.create_task(consume())
        await five.wait()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the cancellation has completed: the native loop has stopped, the session is free
        st1 = e.stats()
        await asyncio.sleep(0.05)
        assert e.stats() == st1, "the native loop kept running after the cancellation"
        again = await e.agenerate(p, max_tokens=25, temp=0)
        return got, st1, again

    e.reset_stats()
    got, st1, again = run(main())
    assert 5 <= len(got) < 3000
    assert "".join(got) == want.text[:len("".join(got))]
    assert [mtp_sm.pieces[t] for t in want.tokens[:len(got)]] == got
    assert st1["tokens_emitted"] >= len(got)
    assert again == want_of(kind, mtp_sm, p, 25, 4096).text


@pytest.mark.parametrize("kind", ["session", "mtp"])
def test_cancel_during_prefill_is_prompt_and_acknowledged(kind, mtp_model, mtp_sm):
    # no prompt cache: the second call must process the whole prompt again
    e = make(kind, mtp_model, n_ctx=4096, n_batch=4096, cache_prompt=False)
    long_prompt = prompt_of(mtp_sm, 4000)
    p = prompt_of(mtp_sm, 3)

    async def main():
        t0 = time.perf_counter()
        await e.agenerate(long_prompt, max_tokens=1, temp=0)
        full = time.perf_counter() - t0
        task = asyncio.create_task(e.agenerate(long_prompt, max_tokens=1, temp=0))
        await asyncio.sleep(full * 0.2)
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.perf_counter() - t0
        # free right now: a sync call would raise SessionBusyError otherwise
        text = e.generate(p, max_tokens=6, temp=0)
        return full, took, text

    try:
        full, took, text = run(main())
        st = e.stats()
    finally:
        e.close()
    assert took < full * 0.5, (took, full)
    assert text == want_of(kind, mtp_sm, p, 6, 4096).text
    assert st["calls"] == 3


def test_wait_for_timeout_cancels(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(e.agenerate(p, max_tokens=3500, temp=0), 0.05)
        return await e.agenerate(p, max_tokens=7, temp=0)

    assert run(main()) == want_of(kind, mtp_sm, p, 7, 4096).text


def test_break_aclose_and_async_with_release_the_session(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 2, 6)
    want = want_of(kind, mtp_sm, p, 6, 4096).text

    async def main():
        async for _ in e.astream(p, max_tokens=500, temp=0):
            break
        assert await e.agenerate(p, max_tokens=6, temp=0) == want     # no gc.collect() needed
        it = e.astream_events(p, max_tokens=500, temp=0)
        first = await it.__anext__()
        assert first[0] == "token"
        await it.aclose()
        await it.aclose()                                             # idempotent
        assert [x async for x in it] == []
        assert it.finish_reason == "cancelled"
        assert await e.agenerate(p, max_tokens=6, temp=0) == want
        async with e.astream(p, max_tokens=500, temp=0) as it2:
            async for _ in it2:
                break
        assert await e.agenerate(p, max_tokens=6, temp=0) == want
        # closing before the first step never opens the stream
        it3 = e.astream(p, max_tokens=5, temp=0)
        await it3.aclose()
        assert it3.finish_reason is None and [x async for x in it3] == []

    e.reset_stats()
    run(main())
    if kind == "mtp":
        assert e.stats()["calls"] == 6


def test_busy_and_argument_errors_surface_on_first_iteration(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3)

    async def main():
        it = e.astream(p, max_tokens=50, temp=0)
        await it.__anext__()
        with pytest.raises(mtp_cy.SessionBusyError):
            await e.agenerate(p, max_tokens=3)
        with pytest.raises(mtp_cy.SessionBusyError):
            e.generate(p, max_tokens=3)
        rest = [x async for x in it]
        assert len(rest) == 49
        with pytest.raises(ValueError, match="max_tokens"):
            await e.agenerate(p, max_tokens=0)
        with pytest.raises(ValueError, match="stop"):
            await alist(e.astream(p, stop=""))
        with pytest.raises(TypeError, match="temperature"):
            await alist(e.astream_events(p, temperature=1.0))
        return await e.agenerate(p, max_tokens=4, temp=0)

    assert run(main()) == want_of(kind, mtp_sm, p, 4, 4096).text


def test_two_sessions_stream_concurrently_on_one_loop(mtp_model, mtp_sm):
    p1, p2 = prompt_of(mtp_sm, 3, 0), prompt_of(mtp_sm, 2, 9)
    a, b = make("session", mtp_model, n_ctx=1024), make("mtp", mtp_model, n_ctx=1024)

    async def main():
        order = []

        async def consume(tag, it):
            out = []
            async for piece in it:
                out.append(piece)
                order.append(tag)
            return "".join(out)

        return await asyncio.gather(consume("a", a.astream(p1, max_tokens=300, temp=0)),
                                    consume("b", b.astream(p2, max_tokens=300, temp=0))), order

    try:
        (ta, tb), order = run(main())
    finally:
        a.close()
        b.close()
    assert ta == want_of("session", mtp_sm, p1, 300, 1024).text
    assert tb == want_of("mtp", mtp_sm, p2, 300, 1024).text
    # interleaved, not one after the other
    first_b = order.index("b")
    assert first_b < len(order) - order[::-1].index("a") - 1


def test_closed_session(mtp_model, mtp_sm):
    s = make("session", mtp_model, n_ctx=64)
    s.close()
    with pytest.raises(mtp_cy.ClosedError):
        s.astream(prompt_of(mtp_sm, 2))
