"""MTP speculative decoding: lossless output, exact statistics, threads, cancellation, leaks.

Every expectation comes from the synthetic model's oracle
(``SyntheticModel.predict(..., rules="mtp_cy")``), which knows what the MTP head
drafts and what the target accepts, so counters are compared exactly.
"""
import _thread
import gc
import logging
import threading
import time

import pytest

import mtp_cy
from conftest import COUNTERS, check_interrupt_stops_prefill, counters, expected, make_engine, prompt_of, rss_bytes

STAT_KEYS = {"iters", "drafts_generated", "drafts_accepted", "acceptance_rate", "tokens_emitted",
             "tokens_per_sec", "timing_us", "n_draft"}
def delta(after, before):
    return {k: after[k] - before[k] for k in COUNTERS}


@pytest.fixture(scope="module")
def mtp(mtp_model):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=512) as m:
        yield m


# ------------------------------------------------------------------ lossless + exact statistics

CONFIGS = [dict(acceptance=a, mtp_head=h, n_trunk=nt, full_attention_interval=iv)
           for a in (0.0, 0.5, 0.75, 1.0) for h in ("own", "shared") for nt, iv in ((4, 4), (3, 2))]


@pytest.mark.parametrize("cfg", CONFIGS,
                         ids=lambda c: "acc{acceptance}-{mtp_head}-L{n_trunk}i{full_attention_interval}".format(**c))
def test_lossless_and_exact_stats(synthetic, cfg):
    sm = synthetic.cached_model(**cfg)
    with mtp_cy.Model(sm.path) as model, mtp_cy.Session(model, n_ctx=256) as plain:
        for n_draft in (1, 2, 3, 4):
            p = prompt_of(sm, 1 + n_draft, start=3 * n_draft)
            want = sm.predict(p, 24, n_draft)
            assert want.tokens == sm.greedy(p, 24).tokens
            with mtp_cy.MTP(model, n_draft=n_draft, n_ctx=256) as m:
                text = m.generate(p, max_tokens=24, temp=0)
                st = m.stats()
            assert text == want.text == plain.generate(p, max_tokens=24, temp=0), (n_draft, cfg)
            assert counters(st) == expected(want), (n_draft, cfg)
            assert st["acceptance_rate"] == pytest.approx(want.acceptance_rate)
            assert st["n_draft"] == n_draft
            if cfg["acceptance"] == 1.0:
                assert want.acceptance_rate == 1.0
            if cfg["acceptance"] == 0.0:
                assert st["drafts_accepted"] == 0


def test_partial_acceptance_rollback_over_long_run(synthetic):
    """Many partial acceptances in a row on a hybrid trunk: the recurrent state must be rolled back right."""
    sm = synthetic.cached_model(acceptance=0.5, n_trunk=6, full_attention_interval=3)
    with mtp_cy.Model(sm.path) as model, mtp_cy.MTP(model, n_draft=4, n_ctx=1024) as m:
        p = prompt_of(sm, 7)
        want = sm.predict(p, 300, 4, n_ctx=1024)
        assert m.generate(p, max_tokens=300, temp=0) == want.text
        assert counters(m.stats()) == expected(want)
        assert 0 < want.drafts_accepted < want.drafts_generated


@pytest.mark.parametrize("kind", ["mtp", "batch"])
def test_prompt_chunk_of_a_verification_shape_keeps_rollback(synthetic, kind):
    """A prompt chunk is decoded without rollback snapshots (vendor/patches/0010); the first
    verification after it, of the same shape (one sequence, n_draft + 1 tokens), must write
    them again (llama.cpp's graph reuse compares the switch). The synthetic model's text does
    not depend on the recurrent state, its log-probabilities do (a little, through the output
    norm): a rejected draft rolled back to a wrong state shows there (the third most likely
    token's 0.0096 off with the snapshots left off), so they must equal a plain Session's, as
    text and counters the oracle's."""
    sm = synthetic.cached_model(acceptance=0.5, n_trunk=6, full_attention_interval=3)
    with mtp_cy.Model(sm.path) as model, mtp_cy.Session(model, n_ctx=256, n_threads=1) as plain:
        for n_draft in (1, 2, 3, 4):
            with make_engine(kind, model, n_draft=n_draft, n_ctx=256, n_threads=1) as e:
                for start in range(6):
                    p = prompt_of(sm, n_draft + 2, start=7 * start + n_draft)
                    want = sm.predict(p, 40, n_draft, n_ctx=256)
                    ref = plain.complete(p, max_tokens=40, temp=0, logprobs=True, top_logprobs=3)
                    before = counters(e.stats())
                    got = e.complete(p, max_tokens=40, temp=0, logprobs=True, top_logprobs=3)
                    assert got.text == want.text == ref.text, (n_draft, start)
                    delta = {k: v - before[k] for k, v in counters(e.stats()).items()}
                    assert delta == expected(want), (n_draft, start)
                    assert want.drafts_accepted < want.drafts_generated
                    for x, y in zip(ref.logprobs, got.logprobs):
                        assert y.logprob == pytest.approx(x.logprob, abs=1e-3), (n_draft, start)
                        for (_, u), (_, v) in zip(x.top_logprobs, y.top_logprobs):
                            assert v == pytest.approx(u, abs=1e-3), (n_draft, start)


def test_stats_keys_and_definitions(mtp, mtp_sm):
    mtp.reset_stats()
    st = mtp.stats()
    assert STAT_KEYS <= set(st)
    assert counters(st) == dict.fromkeys(COUNTERS, 0)
    assert st["acceptance_rate"] == 0.0 and st["tokens_per_sec"] == 0.0
    assert {"draft", "verify", "sample", "total"} <= set(st["timing_us"])
    p = prompt_of(mtp_sm, 3)
    mtp.generate(p, max_tokens=20, temp=0)
    st = mtp.stats()
    t = st["timing_us"]
    assert all(isinstance(v, int) and v >= 0 for v in t.values())
    assert t["total"] >= t["verify"] > 0 and t["total"] >= t["draft"] and t["total"] >= t["sample"]
    assert st["tokens_per_sec"] == pytest.approx(st["tokens_emitted"] / (t["total"] / 1e6), rel=1e-6)
    assert st["acceptance_rate"] == st["drafts_accepted"] / st["drafts_generated"]


def test_stats_are_cumulative_and_resettable(mtp, mtp_sm):
    mtp.reset_stats()
    total = dict.fromkeys(COUNTERS, 0)
    for i, (n, mt) in enumerate([(2, 10), (4, 17), (1, 5)]):
        p = prompt_of(mtp_sm, n, start=5 * i)
        want = sm_predict(mtp_sm, p, mt, 3)
        assert mtp.generate(p, max_tokens=mt, temp=0) == want.text
        for k, v in expected(want).items():
            total[k] += v
        assert counters(mtp.stats()) == total
    mtp.reset_stats()
    assert counters(mtp.stats()) == dict.fromkeys(COUNTERS, 0)


def sm_predict(sm, p, max_tokens, n_draft, n_ctx=512):
    return sm.predict(p, max_tokens, n_draft, n_ctx=n_ctx)


# ------------------------------------------------------------------ bounds, EOG, events

@pytest.mark.parametrize("max_tokens", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("n_draft", [3, 4])
def test_max_tokens_is_exact(mtp_model, mtp_sm, max_tokens, n_draft):
    with mtp_cy.MTP(mtp_model, n_draft=n_draft, n_ctx=128) as m:
        p = prompt_of(mtp_sm, 2, start=max_tokens)
        events = list(m.stream_events(p, max_tokens=max_tokens, temp=0))
        toks = [e for e in events if e[0] == "token"]
        want = sm_predict(mtp_sm, p, max_tokens, n_draft, 128)
        assert [e[1] for e in toks] == want.tokens and len(toks) == max_tokens
        assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "max_tokens"
        assert sum(e[0] in ("done", "eog") for e in events) == 1
        assert counters(m.stats()) == expected(want)
        assert counters(events[-1][1]) == expected(want)
        if max_tokens == 1:
            assert want.drafts_generated == 0 and want.iters == 1


@pytest.mark.parametrize("cfg", [dict(acceptance=1.0, mtp_head="own"), dict(acceptance=0.5, mtp_head="shared")])
def test_eog_ends_generation(synthetic, cfg):
    sm = synthetic.cached_model(eog_after="sea", seed=3, **cfg)
    inv = {v: k for k, v in sm.f.items()}
    with mtp_cy.Model(sm.path) as model:
        for n_draft in (1, 3, 4):
            with mtp_cy.MTP(model, n_draft=n_draft, n_ctx=256) as m:
                for off in (1, 2, 3, 5):
                    t = sm.eog_after
                    for _ in range(off):
                        t = inv[t]
                    p = [sm.token_ids[2], t]
                    want = sm_predict(sm, p, 40, n_draft, 256)
                    assert want.stop == "eog"
                    m.reset_stats()
                    events = list(m.stream_events(p, max_tokens=40, temp=0))
                    assert events[-1] == ("eog", None)
                    assert [e[1] for e in events if e[0] == "token"] == want.tokens
                    assert counters(m.stats()) == expected(want), (n_draft, off)
                    assert m.generate(p, max_tokens=40, temp=0) == want.text


@pytest.mark.parametrize("every", [1, 3, 7])
def test_emit_stats_every(mtp, mtp_sm, every):
    events = list(mtp.stream_events(prompt_of(mtp_sm, 3), max_tokens=20, emit_stats_every=every, temp=0))
    stats_ev = [e for e in events if e[0] == "stats"]
    assert len(stats_ev) == 20 // every
    emitted = [e[1]["tokens_emitted"] for e in stats_ev]
    assert emitted == sorted(emitted)
    # each stats event follows the token that completed the multiple of `every`
    n = 0
    for e in events:
        if e[0] == "token":
            n += 1
        elif e[0] == "stats":
            assert n % every == 0
    assert list(mtp.stream_events(prompt_of(mtp_sm, 3), max_tokens=5, emit_stats_every=0, temp=0))[-1][0] == "done"
    with pytest.raises(ValueError, match="emit_stats_every"):
        mtp.generate(prompt_of(mtp_sm, 3), emit_stats_every=-1)


def test_stream_pieces_and_generate(mtp, mtp_sm):
    p = prompt_of(mtp_sm, 4)
    want = sm_predict(mtp_sm, p, 12, 3)
    pieces = list(mtp.stream(p, max_tokens=12, temp=0))
    assert pieces == [mtp_sm.pieces[t] for t in want.tokens]
    assert all(isinstance(x, str) for x in pieces)
    assert mtp.generate(mtp_sm.decode(p), max_tokens=12, temp=0) == want.text


def test_one_token_prompt_works_without_error_logs(mtp, mtp_sm, caplog):
    p = prompt_of(mtp_sm, 1)
    with caplog.at_level(logging.DEBUG, logger="mtp_cy"):
        mtp.reset_stats()
        assert mtp.generate(p, max_tokens=10, temp=0) == sm_predict(mtp_sm, p, 10, 3).text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert counters(mtp.stats()) == expected(sm_predict(mtp_sm, p, 10, 3))


def test_context_limit_caps_drafts(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft=4, n_ctx=24) as m, mtp_cy.Session(mtp_model, n_ctx=24) as plain:
        p = prompt_of(mtp_sm, 5)
        events = list(m.stream_events(p, max_tokens=100, temp=0))
        want = sm_predict(mtp_sm, p, 100, 4, 24)
        toks = [e[1] for e in events if e[0] == "token"]
        assert toks == want.tokens and want.stop == "ctx_full"
        assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "ctx_full"
        # every position of the context holds a token, and the last one sampled is emitted too,
        # exactly as plain decoding does
        assert len(p) + len(toks) == 24 + 1
        assert m.stats()["iters"] == want.iters
        assert plain.generate(p, max_tokens=100, temp=0) == want.text
        # the session is still fine afterwards
        assert m.generate(p, max_tokens=5, temp=0) == sm_predict(mtp_sm, p, 5, 4, 24).text


# ------------------------------------------------------------------ sampling

def test_seeded_sampling_is_reproducible(mtp, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    opts = dict(max_tokens=30, temp=1.5, top_k=0, top_p=1.0, min_p=0.0)
    a = mtp.generate(p, seed=1234, **opts)
    b = mtp.generate(p, seed=1234, **opts)
    assert a == b
    outs = {mtp.generate(p, seed=s, **opts) for s in range(6)}
    greedy = mtp.generate(p, max_tokens=30, temp=0)
    assert len(outs) > 1 or greedy not in outs, "temperature had no visible effect"


def test_grammar_constrains_output(mtp, mtp_sm):
    words = [mtp_sm.words[0], mtp_sm.words[5]]
    grammar = "root ::= (" + " | ".join('"%s"' % w for w in words) + ")+"
    p = prompt_of(mtp_sm, 3)
    pieces = list(mtp.stream(p, max_tokens=12, temp=0, grammar=grammar))
    assert len(pieces) == 12 and set(pieces) <= set(words), pieces
    # and the grammar does not leak into the next call
    assert mtp.generate(p, max_tokens=6, temp=0) == sm_predict(mtp_sm, p, 6, 3).text


# ------------------------------------------------------------------ errors

def test_constructor_errors(mtp_model, plain_model, mtp_sm):
    with pytest.raises(mtp_cy.MTPUnsupportedError, match="no MTP"):
        mtp_cy.MTP(plain_model)
    assert issubclass(mtp_cy.MTPUnsupportedError, mtp_cy.MTPError)
    with mtp_cy.Model(mtp_sm.path, load_mtp=False) as m2:
        assert not m2.has_mtp
        with pytest.raises(mtp_cy.MTPUnsupportedError, match="load_mtp=False"):
            mtp_cy.MTP(m2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n_draft"):
            mtp_cy.MTP(mtp_model, n_draft=bad)
    for bad in ("3", 2.0, None, True, 65, "AUTO"):
        with pytest.raises(ValueError, match=r"n_draft must be an int in \[1, 64\] or 'auto'"):
            mtp_cy.MTP(mtp_model, n_draft=bad)
    with pytest.raises(ValueError, match="n_draft_max only applies"):
        mtp_cy.MTP(mtp_model, n_draft=3, n_draft_max=4)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p_min"):
            mtp_cy.MTP(mtp_model, p_min=bad)
    with pytest.raises(TypeError, match="n_ctxx"):
        mtp_cy.MTP(mtp_model, n_ctxx=5)
    with pytest.raises(ValueError, match="n_ctx"):
        mtp_cy.MTP(mtp_model, n_ctx=0)
    with pytest.raises(TypeError):
        mtp_cy.MTP(None)
    # llama.cpp would GGML_ASSERT on these (the verification batch must fit one ubatch)
    with pytest.raises(ValueError, match=r"n_draft \+ 2 = 6, but n_ubatch is 2"):
        mtp_cy.MTP(mtp_model, n_draft=4, n_batch=2)
    with pytest.raises(ValueError, match=r"n_ubatch is 5 \(from n_batch=5\).*raise n_batch"):
        mtp_cy.MTP(mtp_model, n_draft=4, n_batch=5)
    with pytest.raises(ValueError, match="n_ubatch"):
        mtp_cy.MTP(mtp_model, n_draft=3, n_ubatch=4)
    # a quantized V cache needs flash attention (llama.cpp would refuse the context)
    for off in ("off", False):
        with pytest.raises(ValueError, match=r"type_v='q4_0' \(a quantized V cache\) needs flash attention"):
            mtp_cy.MTP(mtp_model, type_v="q4_0", flash_attn=off)
    with pytest.raises(ValueError, match="flash_attn must be"):
        mtp_cy.MTP(mtp_model, flash_attn="yes")
    # with 'auto' llama.cpp turns flash attention on for it, and the output is unchanged
    p = prompt_of(mtp_sm, 3)
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=256, type_k="q8_0", type_v="q8_0") as m:
        assert m.generate(p, max_tokens=12, temp=0) == sm_predict(mtp_sm, p, 12, 3, 256).text


def test_long_drafts(mtp_model, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    with mtp_cy.MTP(mtp_model, n_draft=64, n_ctx=128) as m:
        assert m.generate(p, max_tokens=100, temp=0) == sm_predict(mtp_sm, p, 100, 64, 128).text
        assert counters(m.stats()) == expected(sm_predict(mtp_sm, p, 100, 64, 128))
    with mtp_cy.MTP(mtp_model, n_draft=4, n_ctx=64, n_batch=6, n_ubatch=6) as m:
        assert m.generate(prompt_of(mtp_sm, 20), max_tokens=20, temp=0) == \
            sm_predict(mtp_sm, prompt_of(mtp_sm, 20), 20, 4, 64).text


def test_call_errors_leave_session_usable(mtp, mtp_sm, mtp_model):
    p = prompt_of(mtp_sm, 3)
    mtp.reset_stats()
    with pytest.raises(ValueError, match=r"600 tokens.*n_ctx is 512"):
        mtp.generate(prompt_of(mtp_sm, 600))
    assert mtp.stats()["iters"] == 0 and mtp.stats()["timing_us"]["prefill"] == 0
    with pytest.raises(ValueError, match="empty"):
        mtp.generate([])
    with pytest.raises(ValueError, match="max_tokens"):
        mtp.generate(p, max_tokens=0)
    with pytest.raises(ValueError, match="grammar"):
        mtp.generate(p, grammar="root ::= (((")
    with pytest.raises(ValueError, match="token id"):
        mtp.generate([mtp_model.n_vocab + 5])
    with pytest.raises(TypeError, match="temperature"):
        mtp.generate(p, temperature=0.1)
    with pytest.raises(ValueError, match="timeout"):
        mtp.generate(p, timeout=-1)
    assert counters(mtp.stats()) == dict.fromkeys(COUNTERS, 0)
    assert mtp.generate(p, max_tokens=8, temp=0) == sm_predict(mtp_sm, p, 8, 3).text


def test_properties_and_lifetime(mtp_sm):
    model = mtp_cy.Model(mtp_sm.path)
    m = mtp_cy.MTP(model, n_draft=2, n_ctx=300)
    assert m.n_draft == 2 and m.n_ctx == 300 and m.model is model
    assert "n_draft=2" in repr(m)
    del model
    gc.collect()
    p = prompt_of(mtp_sm, 3)
    assert m.generate(p, max_tokens=6, temp=0) == sm_predict(mtp_sm, p, 6, 2, 300).text
    m.model.close()           # deferred: the MTP still uses it
    assert m.generate(p, max_tokens=6, temp=0) == sm_predict(mtp_sm, p, 6, 2, 300).text
    m.close()
    m.close()                 # idempotent
    with pytest.raises(mtp_cy.ClosedError):
        m.generate(p)
    assert m.closed
    assert m.stats()["tokens_emitted"] == 12   # statistics stay readable after close()


# ------------------------------------------------------------------ threads

def test_stats_polled_from_another_thread_are_monotonic(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=2048, n_threads=1) as m:
        seen, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                seen.append(counters(m.stats()))
                time.sleep(0.0005)
        t = threading.Thread(target=poll)
        t.start()
        p = prompt_of(mtp_sm, 3)
        out = m.generate(p, max_tokens=1500, temp=0)
        stop.set()
        t.join()
        assert out == sm_predict(mtp_sm, p, 1500, 3, 2048).text
        assert len(seen) > 3
        assert len({s["tokens_emitted"] for s in seen}) > 1, "no mid-stream progress observed"
        for a, b in zip(seen, seen[1:]):
            assert all(b[k] >= a[k] for k in COUNTERS), (a, b)
        assert all(s["drafts_accepted"] <= s["drafts_generated"] for s in seen)


def test_two_sessions_run_concurrently(mtp_model, mtp_sm):
    """Two MTP objects on two threads: both correct, and their native work overlaps.

    Overlap is measured without trusting the machine to be idle: each session's
    ``timing_us["total"]`` is the wall time its thread spent inside native decode
    steps.  If the GIL were held during those steps, the two threads' native
    intervals could not overlap and their sum would stay below the concurrent
    wall time; with the GIL released (and the threads running at the same time)
    the sum approaches twice the wall time.  On an idle 2-core machine the wall
    time of the concurrent run is also well under the sequential one (printed).
    """
    p = prompt_of(mtp_sm, 3)
    N = 1200
    want = sm_predict(mtp_sm, p, N, 3, 2048).text
    sessions = [mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=2048, n_threads=1) for _ in range(2)]
    try:
        for s in sessions:
            s.generate(p, max_tokens=20, temp=0)   # warm up
        t0 = time.perf_counter()
        for s in sessions:
            assert s.generate(p, max_tokens=N, temp=0) == want
        sequential = time.perf_counter() - t0
        for s in sessions:
            s.reset_stats()
        results = [None, None]
        barrier = threading.Barrier(2)

        def run(i):
            barrier.wait()
            results[i] = sessions[i].generate(p, max_tokens=N, temp=0)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent = time.perf_counter() - t0
        assert results == [want, want]
        native = sum(s.stats()["timing_us"]["total"] for s in sessions) / 1e6
        print(f"sequential {sequential:.2f}s, concurrent {concurrent:.2f}s "
              f"({concurrent / sequential:.2f}x), native time summed {native:.2f}s")
        assert native > 1.3 * concurrent, (native, concurrent)
    finally:
        for s in sessions:
            s.close()


def test_second_stream_on_same_session_is_refused(mtp, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    it = mtp.stream(p, max_tokens=10, temp=0)
    next(it)
    with pytest.raises(mtp_cy.SessionBusyError, match="busy"):
        mtp.generate(p, max_tokens=3)
    err = []

    def other():
        try:
            mtp.generate(p, max_tokens=3)
        except mtp_cy.SessionBusyError as e:
            err.append(e)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(err) == 1
    rest = list(it)
    want = sm_predict(mtp_sm, p, 10, 3)
    assert len(rest) == 9
    assert mtp.generate(p, max_tokens=10, temp=0) == want.text


# ------------------------------------------------------------------ cancellation

@pytest.mark.parametrize("how", ["break", "close", "gc"])
def test_leaving_a_stream_early_stops_the_loop(mtp, mtp_sm, how):
    p = prompt_of(mtp_sm, 3)
    mtp.reset_stats()
    it = mtp.stream(p, max_tokens=200, temp=0)
    if how == "break":
        for _ in it:
            break
        del it
    elif how == "close":
        next(it)
        it.close()
        it.close()
        with pytest.raises(StopIteration):
            next(it)
    else:
        next(it)
        del it
        gc.collect()
    st = mtp.stats()
    assert st["iters"] == 1, st      # the native loop ran exactly the iteration that produced the token
    mtp.reset_stats()
    want = sm_predict(mtp_sm, p, 15, 3)
    assert mtp.generate(p, max_tokens=15, temp=0) == want.text
    assert counters(mtp.stats()) == expected(want)


def test_cancel_from_another_thread(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=4096, n_threads=1) as m:
        p = prompt_of(mtp_sm, 3)
        got, first = [], threading.Event()

        def canceller():
            first.wait(30)
            time.sleep(0.05)
            m.cancel()
        t = threading.Thread(target=canceller)
        t.start()
        for piece in m.stream(p, max_tokens=3500, temp=0):
            got.append(piece)
            first.set()
        t.join()
        assert 0 < len(got) < 3500
        assert "".join(got) == sm_predict(mtp_sm, p, len(got), 3, 4096).text
        assert m.generate(p, max_tokens=6, temp=0) == sm_predict(mtp_sm, p, 6, 3, 4096).text


def test_cancel_between_steps_is_acknowledged(mtp, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    mtp.cancel()                     # no stream running: no effect on the next call
    assert mtp.generate(p, max_tokens=7, temp=0) == sm_predict(mtp_sm, p, 7, 3).text
    mtp.reset_stats()
    it = mtp.stream_events(p, max_tokens=100, temp=0)
    first = next(it)
    assert first[0] == "token"
    mtp.cancel()
    rest = list(it)
    assert rest[-1][0] == "done" and rest[-1][1]["stop_reason"] == "cancelled"
    toks = [first[1]] + [e[1] for e in rest if e[0] == "token"]
    assert toks == sm_predict(mtp_sm, p, len(toks), 3).tokens
    assert mtp.stats()["iters"] == 1     # only the tokens of the step already made
    assert mtp.generate(p, max_tokens=7, temp=0) == sm_predict(mtp_sm, p, 7, 3).text


def test_keyboard_interrupt_stops_prefill(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=4096, n_batch=4096, n_threads=1) as m:
        check_interrupt_stops_prefill(m, prompt_of(mtp_sm, 4000))
        p = prompt_of(mtp_sm, 3)
        assert m.generate(p, max_tokens=8, temp=0) == sm_predict(mtp_sm, p, 8, 3, 4096).text


def test_keyboard_interrupt_stops_decode(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=8192, n_threads=1) as m:
        p = prompt_of(mtp_sm, 3)
        timer = threading.Timer(0.1, _thread.interrupt_main)
        got = []
        timer.start()
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            for piece in m.stream(p, max_tokens=8000, temp=0):
                got.append(piece)
        took = time.perf_counter() - t0
        timer.join()
        assert took < 2.0 and len(got) < 8000
        assert m.generate(p, max_tokens=8, temp=0) == sm_predict(mtp_sm, p, 8, 3, 8192).text


def test_timeout_raises_and_session_stays_usable(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=4096, n_batch=4096, n_threads=1) as m:
        with pytest.raises(mtp_cy.GenerationTimeout) as ei:
            # timeout bounds each decode step: a microsecond is too short for any
            m.generate(prompt_of(mtp_sm, 3), max_tokens=5, timeout=1e-6)
        assert isinstance(ei.value, TimeoutError)
        # prompt_timeout bounds the prompt (4000 tokens take far longer than 1 ms)
        with pytest.raises(mtp_cy.GenerationTimeout, match="processing the prompt"):
            m.generate(prompt_of(mtp_sm, 4000), max_tokens=5, prompt_timeout=0.001)
        assert isinstance(ei.value, TimeoutError)
        p = prompt_of(mtp_sm, 3)
        assert m.generate(p, max_tokens=8, temp=0) == sm_predict(mtp_sm, p, 8, 3, 4096).text


# ------------------------------------------------------------------ upstream cross-check + leaks

def test_print_stats_reports_upstream_summary(mtp, mtp_sm, caplog):
    mtp.generate(prompt_of(mtp_sm, 3), max_tokens=20, temp=0)
    with caplog.at_level(logging.INFO, logger="mtp_cy"):
        text = mtp.print_stats()
    assert "draft" in text.lower() or "mtp" in text.lower(), text
    assert any(r.name == "mtp_cy" for r in caplog.records)


def test_no_leak_over_1000_calls_and_50_sessions(mtp_model, mtp_sm):
    p = prompt_of(mtp_sm, 2)
    with mtp_cy.MTP(mtp_model, n_draft=2, n_ctx=64, n_threads=1) as m:
        for _ in range(100):
            m.generate(p, max_tokens=3, temp=0)
        gc.collect()
        before = rss_bytes()
        for _ in range(1000):
            m.generate(p, max_tokens=3, temp=0)
        gc.collect()
        grown = rss_bytes() - before
        assert m.stats()["tokens_emitted"] == 1100 * 3
    assert grown < 8 * 2**20, grown
    for _ in range(5):
        mtp_cy.MTP(mtp_model, n_draft=2, n_ctx=64, n_threads=1).close()
    gc.collect()
    before = rss_bytes()
    for _ in range(50):
        with mtp_cy.MTP(mtp_model, n_draft=2, n_ctx=64, n_threads=1) as m:
            m.generate(p, max_tokens=2, temp=0)
    gc.collect()
    assert rss_bytes() - before < 16 * 2**20


def test_per_call_n_draft_overrides_the_session(mtp_model, mtp_sm):
    """A call's n_draft= on an MTP drafts that many (0: plain steps) with the oracle's exact
    counters; on MTP(n_draft="auto") such a call leaves the policy untouched."""
    p = prompt_of(mtp_sm, 4)
    with mtp_cy.Session(mtp_model, n_ctx=256, n_threads=1) as s:
        ref = s.complete(p, max_tokens=30, temp=0)
        assert s.complete(p, max_tokens=30, temp=0, n_draft=0).tokens == ref.tokens
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=256, n_threads=1) as m:
        for k in (0, 1, 2, 3):
            c = m.complete(p, max_tokens=30, temp=0, n_draft=k)
            assert c.tokens == ref.tokens
            if k:
                assert counters(c.stats) == expected(mtp_sm.predict(p, 30, k, n_ctx=256))
            else:
                assert c.stats["iters"] == 30 and c.stats["drafts_generated"] == 0
            assert c.stats["n_draft"] == k
        assert m.complete(p, max_tokens=30, temp=0).stats["n_draft"] == 3
    with mtp_cy.MTP(mtp_model, n_draft="auto", n_ctx=256, n_threads=1) as m:
        c = m.complete(p, max_tokens=30, temp=0, n_draft=2)
        assert c.tokens == ref.tokens and counters(c.stats) == expected(mtp_sm.predict(p, 30, 2, n_ctx=256))
        assert m.stats()["policy"]["iterations"] == 0          # the fixed call taught it nothing
        assert m.complete(p, max_tokens=30, temp=0).tokens == ref.tokens
        assert m.stats()["policy"]["iterations"] > 0
