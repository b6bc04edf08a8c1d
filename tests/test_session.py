"""Session: plain decoding, the baseline of every MTP result."""
import gc
import threading
import time

import pytest

import mtp_cy
from conftest import check_interrupt_stops_prefill, prompt_of, rss_bytes


@pytest.fixture(scope="module")
def sess(plain_model):
    s = mtp_cy.Session(plain_model, n_ctx=2048)
    yield s
    s.close()


@pytest.mark.parametrize("n_prompt", [1, 2, 5])
@pytest.mark.parametrize("max_tokens", [1, 4, 16, 40])
def test_greedy_matches_oracle(sess, plain_sm, n_prompt, max_tokens):
    p = prompt_of(plain_sm, n_prompt, start=n_prompt)
    want = plain_sm.greedy(p, max_tokens)
    events = list(sess.stream_events(p, max_tokens=max_tokens, temp=0))
    toks = [e[1] for e in events if e[0] == "token"]
    assert toks == want.tokens
    assert "".join(e[2] for e in events if e[0] == "token") == want.text
    assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "max_tokens"
    assert [e[0] for e in events].count("done") == 1
    assert sess.generate(p, max_tokens=max_tokens, temp=0) == want.text


def test_stream_yields_one_piece_per_token(sess, plain_sm):
    p = prompt_of(plain_sm, 3)
    pieces = list(sess.stream(p, max_tokens=12, temp=0))
    assert pieces == [plain_sm.pieces[t] for t in plain_sm.greedy(p, 12).tokens]


def test_text_prompt(sess, plain_sm):
    text = "".join(plain_sm.words[:3])
    assert sess.generate(text, max_tokens=6, temp=0) == plain_sm.greedy(plain_sm.token_ids[:3], 6).text


def test_kv_cache_cleared_each_call(sess, plain_sm):
    a = sess.generate(prompt_of(plain_sm, 3, 0), max_tokens=8, temp=0)
    b = sess.generate(prompt_of(plain_sm, 4, 7), max_tokens=8, temp=0)
    assert a == sess.generate(prompt_of(plain_sm, 3, 0), max_tokens=8, temp=0)
    assert b == plain_sm.greedy(prompt_of(plain_sm, 4, 7), 8).text


def test_eog_ends_generation(synthetic):
    sm = synthetic.cached_model(mtp=False, eog_after=5)
    with mtp_cy.Model(sm.path) as m, mtp_cy.Session(m, n_ctx=256) as s:
        start = sm.token_ids.index(sm.f_inverse_chain_start(5)) if hasattr(sm, "f_inverse_chain_start") else 0
        p = prompt_of(sm, 2, start)
        want = sm.greedy(p, 200)
        assert want.stop == "eog"
        events = list(s.stream_events(p, max_tokens=200, temp=0))
        assert events[-1] == ("eog", None)
        assert [e[1] for e in events if e[0] == "token"] == want.tokens
        assert s.stats()["tokens_emitted"] == len(want.tokens)


def test_seeded_sampling_is_reproducible_and_temp_matters(sess, plain_sm):
    p = prompt_of(plain_sm, 3)
    a = sess.generate(p, max_tokens=48, temp=2.0, seed=1234)
    b = sess.generate(p, max_tokens=48, temp=2.0, seed=1234)
    c = sess.generate(p, max_tokens=48, temp=2.0, seed=99)
    greedy = plain_sm.greedy(p, 48).text
    assert a == b
    assert a != greedy or c != greedy  # the runner-up token shows up at temp 2
    assert sess.generate(p, max_tokens=48, temp=0, seed=5) == greedy


def test_grammar_constrains_output(sess, plain_sm):
    w1, w2 = plain_sm.words[3], plain_sm.words[8]
    g = f'root ::= ("{w1}" | "{w2}")+'
    out = list(sess.stream(prompt_of(plain_sm, 2), max_tokens=10, temp=0, grammar=g))
    assert len(out) == 10 and set(out) <= {w1, w2}
    g2 = f'start ::= "{w1}"+'
    assert set(sess.stream(prompt_of(plain_sm, 2), max_tokens=3, temp=0, grammar=g2,
                           grammar_root="start")) == {w1}


def test_utf8_split_across_tokens_is_yielded_whole(sess, plain_model, plain_sm):
    # the grammar forces "é" (two bytes); every non-word token ties, so greedy takes
    # the single-byte tokens: the character is split across two tokens
    events = list(sess.stream_events(prompt_of(plain_sm, 2), max_tokens=6, temp=0,
                                     grammar='root ::= "é"+'))
    toks = [e for e in events if e[0] == "token"]
    pieces = [e[2] for e in toks]
    assert "".join(pieces) == "é" * 3
    assert all(p in ("", "é") for p in pieces)
    raw = [plain_model.token_to_piece(e[1]) for e in toks]
    assert any(len(r) == 1 for r in raw), raw  # it really was split
    assert list(sess.stream(prompt_of(plain_sm, 2), max_tokens=6, temp=0, grammar='root ::= "é"+')) == ["é"] * 3


def test_gil_released_during_native_work(plain_model, plain_sm):
    """Another Python thread keeps running while a Session is in native code.

    Long prefills (distinct prompts: no prefix reuse) run for at least 0.3 s in all; a ticker
    thread wakes every millisecond.  With the GIL held in native code, (almost) no tick could
    fall inside a native call; released, they keep coming.  Counting ticks instead of timing
    one call keeps this meaningful on a GPU, where one 4000-token prefill takes milliseconds.
    """
    s = mtp_cy.Session(plain_model, n_ctx=4096, n_batch=4096, n_threads=1)
    ticks, calls, stop = [], [], threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)
    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.02)
    begin = time.perf_counter()
    i = 0
    while time.perf_counter() - begin < 0.3 and i < 200:
        prompt = prompt_of(plain_sm, 4000, start=i)
        t0 = time.perf_counter()
        s.generate(prompt, max_tokens=1, temp=0)          # one long prefill in native code
        calls.append((t0, time.perf_counter()))
        i += 1
    stop.set()
    t.join()
    s.close()
    native = sum(b - a for a, b in calls)
    assert native > 0.2, "prefills too short to tell"
    inside = sum(1 for x in ticks if any(a < x < b for a, b in calls))
    # ~1 tick per ms when the GIL is free; allow a heavily loaded machine 10x fewer
    assert inside >= 0.1 * native / 0.001, (inside, native, len(calls))


def test_busy_session_refuses_second_stream(sess, plain_sm):
    p = prompt_of(plain_sm, 2)
    it = sess.stream(p, max_tokens=10, temp=0)
    next(it)
    with pytest.raises(mtp_cy.SessionBusyError):
        sess.stream(p, max_tokens=3)
    it.close()
    assert sess.generate(p, max_tokens=3, temp=0) == plain_sm.greedy(p, 3).text


def test_leaving_a_stream_early_frees_the_session(sess, plain_sm):
    p = prompt_of(plain_sm, 2)
    for piece in sess.stream(p, max_tokens=50, temp=0):
        break
    gc.collect()
    assert sess.generate(p, max_tokens=5, temp=0) == plain_sm.greedy(p, 5).text
    it = sess.stream(p, max_tokens=50, temp=0)
    next(it)
    del it
    assert sess.generate(p, max_tokens=5, temp=0) == plain_sm.greedy(p, 5).text


def test_timeout_raises_and_session_stays_usable(plain_model, plain_sm):
    with mtp_cy.Session(plain_model, n_ctx=4096, n_batch=4096, n_threads=1) as s:
        with pytest.raises(mtp_cy.GenerationTimeout) as ei:
            # timeout bounds each decode step: a microsecond is too short for any
            s.generate(prompt_of(plain_sm, 3), max_tokens=5, timeout=1e-6)
        assert isinstance(ei.value, TimeoutError)
        # prompt_timeout bounds the prompt (4000 tokens take far longer than 1 ms)
        with pytest.raises(mtp_cy.GenerationTimeout, match="processing the prompt"):
            s.generate(prompt_of(plain_sm, 4000), max_tokens=5, prompt_timeout=0.001)
        assert isinstance(ei.value, TimeoutError)
        p = prompt_of(plain_sm, 3)
        assert s.generate(p, max_tokens=5, temp=0) == plain_sm.greedy(p, 5).text


def test_keyboard_interrupt_stops_prefill(plain_model, plain_sm):
    with mtp_cy.Session(plain_model, n_ctx=4096, n_batch=4096, n_threads=1) as s:
        check_interrupt_stops_prefill(s, prompt_of(plain_sm, 4000))
        p = prompt_of(plain_sm, 3)
        assert s.generate(p, max_tokens=4, temp=0) == plain_sm.greedy(p, 4).text


def test_context_full_ends_cleanly(plain_model, plain_sm):
    with mtp_cy.Session(plain_model, n_ctx=16) as s:
        events = list(s.stream_events(prompt_of(plain_sm, 4), max_tokens=100, temp=0))
        assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "ctx_full"
        n = len([e for e in events if e[0] == "token"])
        assert 10 <= n <= 13


def test_no_leak_over_1000_calls(plain_model, plain_sm):
    s = mtp_cy.Session(plain_model, n_ctx=64, n_threads=1)
    p = prompt_of(plain_sm, 2)
    for _ in range(100):
        s.generate(p, max_tokens=2, temp=0)
    gc.collect()
    before = rss_bytes()
    for _ in range(1000):
        s.generate(p, max_tokens=2, temp=0)
    gc.collect()
    grown = rss_bytes() - before
    s.close()
    assert grown < 8 * 2**20, grown
    before = rss_bytes()
    for _ in range(50):
        mtp_cy.Session(plain_model, n_ctx=64, n_threads=1).close()
    gc.collect()
    assert rss_bytes() - before < 16 * 2**20
