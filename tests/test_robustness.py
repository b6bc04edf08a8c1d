"""Hostile use: every reproducer of issue #15 runs in a subprocess, so a crash or a hang
fails the test instead of killing the test run.  Each child prints ``OK`` as its last
line when the behaviour is right."""
import os
import subprocess
import sys
import textwrap

import pytest

HEADER = """
import gc, signal, sys, threading, time
import mtp_cy
from mtp_cy import synthetic
sm = synthetic.cached_model(mtp=True, acceptance=0.75)
m = mtp_cy.Model(sm.path)
"""


def run_child(body, timeout=120):
    code = HEADER + textwrap.dedent(body)
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"child died (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    lines = p.stdout.strip().splitlines()
    assert lines and lines[-1] == "OK", f"child output:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return lines


# ---------------------------------------------------------------- crashes and hangs

@pytest.mark.parametrize("kind", ["Session", "MTP"])
def test_stream_outliving_its_closed_model_raises_closed(kind):
    run_child(f"""
        s = mtp_cy.{kind}(m)
        it = s.stream(" the sea", temp=0)
        next(it)
        s.close(); m.close()
        try:
            next(it)
        except mtp_cy.ClosedError as e:
            print("closed:", e)
        else:
            raise SystemExit("no ClosedError")
        # the stream stays finished; the weights are gone once the stream is
        del it; gc.collect()
        print("OK")
    """)


@pytest.mark.parametrize("kind", ["Session", "MTP"])
def test_signal_handler_closing_session_and_model_mid_generation(kind):
    """SIGALRM handler doing s.close(); m.close() while a long prompt is processed and
    while tokens are generated: no crash, no hang; the call ends with ClosedError."""
    run_child(f"""
        for when in ("prefill", "decode"):
            m2 = mtp_cy.Model(sm.path)
            s = mtp_cy.{kind}(m2, n_ctx=8192, n_threads=1)
            def handler(*a):
                s.close(); m2.close()
            signal.signal(signal.SIGALRM, handler)
            prompt = list(m2.tokenize(" the sea" * 4000))[:8000] if when == "prefill" else " the"
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            t0 = time.time()
            try:
                s.generate(prompt, max_tokens=100000 if when == "decode" else 5, temp=0, timeout=None)
            except mtp_cy.ClosedError:
                pass
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert s.closed and m2.closed
            assert time.time() - t0 < 60
            try:
                s.generate(" the")
            except mtp_cy.ClosedError:
                pass
            else:
                raise SystemExit("closed session still generates")
        print("OK")
    """)


@pytest.mark.parametrize("kind", ["Session", "MTP"])
def test_signal_handler_calling_close_does_not_hang(kind):
    run_child(f"""
        s = mtp_cy.{kind}(m, n_ctx=8192, n_threads=1)
        signal.signal(signal.SIGALRM, lambda *a: s.close())
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        try:
            s.generate(list(m.tokenize(" the sea" * 4000))[:8000], max_tokens=5)
        except mtp_cy.ClosedError:
            pass
        assert s.closed
        print("OK")
    """, timeout=90)


@pytest.mark.parametrize("n_draft, n_ctx, n_batch", [(3, 4, 8), (1, 2, None), (8, 9, None), (4, 6, 6)])
def test_mtp_small_context_larger_batch(n_draft, n_ctx, n_batch):
    """llama.cpp clamps n_ubatch to n_ctx: that used to GGML_ASSERT in MTP."""
    run_child(f"""
        kw = dict(n_ctx={n_ctx})
        if {n_batch!r} is not None:
            kw["n_batch"] = {n_batch!r}
        p = " the" if {n_ctx} > 2 else [sm.token_ids[0]]
        a = mtp_cy.MTP(m, n_draft={n_draft}, **kw).generate(p, temp=0)
        b = mtp_cy.Session(m, n_ctx={n_ctx}).generate(p, temp=0)
        assert a == b, (a, b)
        print("OK")
    """)


@pytest.mark.parametrize("kind", ["Session", "MTP"])
@pytest.mark.parametrize("grammar", [r'root ::= "\x00"', r'root ::= "a\x00"', r'root ::= [\x00]'])
def test_grammar_admitting_nul_raises_and_session_stays_usable(kind, grammar):
    run_child(f"""
        s = mtp_cy.{kind}(m)
        for _ in range(3):
            try:
                s.generate(" the", grammar={grammar!r}, max_tokens=8)
            except mtp_cy.NativeError as e:
                # plain sampling fails accepting the token; speculative sampling (MTP's default
                # when sampling) finds first that the grammar allows no token
                assert "Unexpected empty grammar stack" in str(e) or "grammar allows no token" in str(e), e
                assert isinstance(e, mtp_cy.MTPError)
            else:
                raise SystemExit("no NativeError")
        want = mtp_cy.Session(m).generate(" the sea", temp=0, max_tokens=10)
        assert s.generate(" the sea", temp=0, max_tokens=10) == want
        print("OK")
    """)


def test_vocab_only_model_is_refused_cleanly():
    run_child("""
        v = mtp_cy.Model(sm.path, vocab_only=True)
        assert v.vocab_only and len(v.tokenize(" the")) == 1
        for cls in (mtp_cy.Session, mtp_cy.MTP):
            try:
                cls(v)
            except ValueError as e:
                assert "vocab_only" in str(e), e
            else:
                raise SystemExit(f"{cls.__name__} accepted a vocab-only model")
        print("OK")
    """)


@pytest.mark.parametrize("kind", ["Session", "MTP"])
def test_one_sync_stream_from_two_threads(kind):
    run_child(f"""
        s = mtp_cy.{kind}(m, n_ctx=4096)
        errors = []
        for rnd in range(40):
            it = s.stream(" the", max_tokens=200, temp=0)
            def eat():
                try:
                    for _ in it:
                        pass
                except ValueError as e:
                    assert "already executing" in str(e), e
                    errors.append(e)
            ts = [threading.Thread(target=eat) for _ in range(2)]
            for t in ts: t.start()
            for t in ts: t.join()
            it.close()
        print("refused", len(errors))
        assert s.generate(" the", max_tokens=5, temp=0)
        print("OK")
    """, timeout=300)


@pytest.mark.parametrize("kind", ["Session", "MTP"])
def test_stream_collected_by_the_cyclic_gc_frees_the_session(kind):
    run_child(f"""
        s = mtp_cy.{kind}(m)
        it = s.stream(" the", temp=0)
        next(it)
        c = [it]; c.append(c)
        del it, c
        gc.collect()
        assert s.generate(" the", max_tokens=3, temp=0)
        # and a frame/traceback cycle holding a stream
        def f():
            it = s.stream(" the", temp=0)
            next(it)
            try:
                raise RuntimeError("x")
            except RuntimeError as e:
                return e
        err = f()
        del err
        gc.collect()
        assert s.generate(" the", max_tokens=3, temp=0)
        print("OK")
    """)


# ---------------------------------------------------------------- losslessness at the edge

@pytest.mark.parametrize("n_ctx", [9, 16, 17, 24])
@pytest.mark.parametrize("n_draft", [1, 3, 4])
def test_mtp_equals_plain_when_the_context_fills(mtp_model, mtp_sm, n_ctx, n_draft):
    import mtp_cy
    with mtp_cy.Session(mtp_model, n_ctx=n_ctx) as plain, \
            mtp_cy.MTP(mtp_model, n_draft=n_draft, n_ctx=n_ctx) as m:
        for n_prompt in (1, 3, n_ctx - 2, n_ctx - 1):
            if n_prompt < 1:
                continue
            p = [mtp_sm.token_ids[i % len(mtp_sm.token_ids)] for i in range(n_prompt)]
            a = plain.stream(p, max_tokens=100, temp=0)
            ta = "".join(a)
            b = m.stream(p, max_tokens=100, temp=0)
            tb = "".join(b)
            assert ta == tb, (n_prompt, ta, tb)
            assert a.stop_reason == b.stop_reason == "ctx_full"
            assert a.finish_reason == b.finish_reason == "length"
            assert len(m.model.tokenize(tb, add_special=False)) == n_ctx - n_prompt + 1


# ---------------------------------------------------------------- bad numbers

@pytest.mark.parametrize("opt, value, match", [
    ("timeout", 1e13, r"timeout must be in \(0, 1e9\]"),
    ("timeout", -1, "timeout must be"),
    ("timeout", float("nan"), "timeout must be"),
    ("prompt_timeout", 0, "prompt_timeout must be"),
    ("seed", 2 ** 32, r"seed must be an int in \[0, 4294967294\]"),
    ("seed", -1, "seed must be"),
    ("max_tokens", 2 ** 31, r"max_tokens must be an int in \[1, 2147483647\]"),
    ("max_tokens", 0, "max_tokens must be"),
    ("top_k", 2 ** 31, r"top_k must be an int in \[0, "),
    ("penalty_last_n", 2 ** 31, "penalty_last_n must be an int"),
    ("penalty_last_n", -2, "penalty_last_n must be an int"),
    ("temp", -0.5, "temp must be >= 0"),
    ("temp", float("inf"), "temp must be finite"),
    ("top_p", 10 ** 400, "top_p is out of range"),
    ("emit_stats_every", -1, "emit_stats_every must be"),
])
def test_bad_numbers_name_the_parameter(mtp_model, opt, value, match):
    import mtp_cy
    with mtp_cy.Session(mtp_model, n_ctx=64) as s:
        with pytest.raises(ValueError, match=match):
            s.generate(" the", **{opt: value})
        assert s.generate(" the", max_tokens=2, temp=0)


@pytest.mark.parametrize("opt, value, match", [
    ("n_ctx", 2 ** 32, r"n_ctx must be an int in \[1, "),
    ("n_ctx", 0, "n_ctx must be"),
    ("n_batch", 2 ** 40, "n_batch must be"),
    ("n_threads", 2 ** 31, "n_threads must be"),
    ("cache_checkpoints", -1, "cache_checkpoints must be"),
])
def test_bad_context_numbers_name_the_parameter(mtp_model, opt, value, match):
    import mtp_cy
    with pytest.raises(ValueError, match=match):
        mtp_cy.Session(mtp_model, **{opt: value})


def test_timeouts_inf_none_and_tiny(mtp_model):
    import mtp_cy
    with mtp_cy.Session(mtp_model, n_ctx=64) as s:
        assert s.generate(" the", max_tokens=3, temp=0, timeout=float("inf")) == \
            s.generate(" the", max_tokens=3, temp=0, timeout=None)
        # a positive timeout below a microsecond is a real (tiny) timeout, not "none"
        with pytest.raises(mtp_cy.GenerationTimeout):
            s.generate(" the", max_tokens=50, temp=0, timeout=1e-9)


def test_huge_penalty_window_is_bounded_by_the_context(mtp_model):
    import mtp_cy
    from conftest import rss_bytes
    with mtp_cy.Session(mtp_model, n_ctx=64) as s:
        before = rss_bytes()
        s.generate(" the", max_tokens=3, temp=0, penalty_last_n=2 ** 31 - 1)
        assert rss_bytes() - before < 200 * 2 ** 20


@pytest.mark.parametrize("kind", ["Session", "MTP"])
def test_init_twice_is_refused(mtp_model, kind):
    import mtp_cy
    s = getattr(mtp_cy, kind)(mtp_model, n_ctx=64)
    with pytest.raises(mtp_cy.MTPError, match="called twice"):
        s.__init__(mtp_model, n_ctx=64)
    assert s.generate(" the", max_tokens=2, temp=0)
    s.close()


# ---------------------------------------------------------------- error details per call

def test_error_details_belong_to_the_failing_thread(tmp_path, mtp_sm):
    """Two threads fail at the same time, each with its own llama.cpp message: each
    exception quotes its own thread's message, never the other one's."""
    import threading
    import mtp_cy
    data = open(mtp_sm.path, "rb").read()
    # truncated at different places: llama.cpp names a different tensor for each file
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(data[: len(data) // 2])
    b.write_bytes(data[: len(data) // 3])
    mine = {str(a): "'output.weight'", str(b): "'token_embd.weight'"}
    bad = []
    barrier = threading.Barrier(2)

    def worker(path, other):
        barrier.wait()
        for _ in range(40):
            try:
                mtp_cy.Model(path)
            except mtp_cy.ModelLoadError as e:
                msg = str(e)
                if mine[path] not in msg or mine[other] in msg:
                    bad.append(msg)
            else:
                bad.append("loaded a truncated file")

    ts = [threading.Thread(target=worker, args=(str(a), str(b))),
          threading.Thread(target=worker, args=(str(b), str(a)))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad, bad[:3]
