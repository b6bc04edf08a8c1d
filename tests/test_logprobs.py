"""Log-probabilities (issue #16, part 4), exact on synthetic models.

A synthetic model's logits are designed (``mtp_cy/synthetic.py``): after a token ``t``
the greedy token ``f(t)`` has logit 0, the runner-up ``r(t)`` -2, the other words of
S -20, the EOG token -60 and every other token -40, all times a common factor ``c``
(1 up to ~1e-3, from the RMS norm).  So the greedy token's log-probability is

    -log(1 + e^(-2c) + (W-2) e^(-20c) + e^(-60c) + (V-W-1) e^(-40c))

and every other token's is that minus ``c`` times its distance.  ``c`` is measured
from the gap between the greedy token and the runner-up (exactly ``2c``), then every
value is checked against the formula with a tight tolerance.
"""
import math

import pytest

import mtp_cy
from conftest import prompt_of

N_CTX = 256


def greedy_logprob(sm, c):
    W, V = sm.n_words, sm.n_vocab
    return -math.log(1 + math.exp(-2 * c) + (W - 2) * math.exp(-20 * c) + math.exp(-60 * c)
                     + (V - W - 1) * math.exp(-40 * c))


def check_exact(sm, prev, tok, lp, top):
    """One token's record against the design: returns the measured common factor c."""
    greedy, runner = sm.next_token(prev), sm.runner_up[sm.member(prev)]
    assert top[0][0] == greedy and top[1][0] == runner
    c = (top[0][1] - top[1][1]) / 2
    assert abs(c - 1) < 2e-3, c
    g = greedy_logprob(sm, c)
    assert top[0][1] == pytest.approx(g, abs=2e-6)
    assert abs(g - greedy_logprob(sm, 1.0)) < 1e-3          # "up to the common factor"
    for tid, v in top[2:]:
        assert tid in sm.f and tid not in (greedy, runner)   # the next tier: other words of S
        assert v == pytest.approx(g - 20 * c, abs=1e-4)
    if tok == greedy:
        assert lp == top[0][1]
    elif tok == runner:
        assert lp == top[1][1]
    elif tok in sm.f:
        assert lp == pytest.approx(g - 20 * c, abs=1e-4)
    else:
        assert lp == pytest.approx(g - 40 * c, abs=1e-4)
    return c


def test_greedy_logprobs_match_the_design(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 5)
    c = e.complete(p, max_tokens=12, temp=0, logprobs=True, top_logprobs=4)
    assert c.tokens == mtp_sm.greedy(p, 12).tokens
    assert len(c.logprobs) == 12
    prev = p[-1]
    for t in c.logprobs:
        assert isinstance(t, mtp_cy.TokenLogprob)
        assert t.text == mtp_sm.pieces[t.token] and len(t.top_logprobs) == 4
        check_exact(mtp_sm, prev, t.token, t.logprob, t.top_logprobs)
        prev = t.token


def test_mtp_logprobs_equal_session_logprobs(mtp_model, mtp_sm):
    """Verified draft tokens get the log-probabilities plain decoding gives them."""
    p = prompt_of(mtp_sm, 4, 9)
    with mtp_cy.Session(mtp_model, n_ctx=N_CTX, n_threads=1) as s, \
            mtp_cy.MTP(mtp_model, n_draft=4, n_ctx=N_CTX, n_threads=1) as m:
        a = s.complete(p, max_tokens=20, temp=0, logprobs=True, top_logprobs=3)
        b = m.complete(p, max_tokens=20, temp=0, logprobs=True, top_logprobs=3)
    assert b.stats["drafts_accepted"] > 0
    assert a.tokens == b.tokens
    for x, y in zip(a.logprobs, b.logprobs):
        assert (x.token, x.text) == (y.token, y.text)
        assert x.logprob == pytest.approx(y.logprob, abs=1e-3)
        assert [t for t, _ in x.top_logprobs[:2]] == [t for t, _ in y.top_logprobs[:2]]
        for (_, u), (_, v) in zip(x.top_logprobs, y.top_logprobs):
            assert u == pytest.approx(v, abs=1e-3)


def test_events_carry_the_records(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 2, 1)
    s = e.stream_events(p, max_tokens=6, temp=0, logprobs=True, top_logprobs=2)
    events = list(s)
    toks = [x for x in events if x[0] == "token"]
    assert len(toks) == 6 and all(len(x) == 4 for x in toks)
    for (_, tid, piece, rec), t in zip(toks, s.completion.logprobs):
        assert set(rec) == {"logprob", "top_logprobs", "text"}
        assert rec["text"] == piece == t.text and tid == t.token
        assert rec["logprob"] == t.logprob and tuple(rec["top_logprobs"]) == t.top_logprobs
        assert all(isinstance(a, int) and isinstance(b, float) for a, b in rec["top_logprobs"])
    # top_logprobs=0: the token's own log-probability only
    c = e.complete(p, max_tokens=3, temp=0, logprobs=True)
    assert [t.top_logprobs for t in c.logprobs] == [(), (), ()]
    assert c.logprobs[0].logprob == pytest.approx(greedy_logprob(mtp_sm, 1.0), abs=1e-3)
    # not asked for: plain 3-tuples, no records
    events = list(e.stream_events(p, max_tokens=3, temp=0))
    assert all(len(x) == 3 for x in events if x[0] == "token")
    assert e.complete(p, max_tokens=3, temp=0).logprobs is None


def test_sampled_and_forced_tokens_get_their_raw_logprob(engine, mtp_sm):
    """Log-probabilities are those of the raw logits: temperature and grammar change which
    token is chosen, not the reported value."""
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 2)
    c = e.complete(p, max_tokens=40, temp=1.5, seed=7, logprobs=True, top_logprobs=3)
    prev, runners = p[-1], 0
    for t in c.logprobs:
        assert t.token in (mtp_sm.next_token(prev), mtp_sm.runner_up[mtp_sm.member(prev)])
        runners += t.token != mtp_sm.next_token(prev)
        check_exact(mtp_sm, prev, t.token, t.logprob, t.top_logprobs)
        prev = t.token
    assert runners > 0          # ~20% of the tokens at temp 1.5
    # a grammar forcing words off the greedy path: the -20 tier
    words = [mtp_sm.words[k] for k in (4, 17, 30)]
    g = "root ::= " + " ".join(f'"{w}"' for w in words)
    c = e.complete(p, max_tokens=10, temp=0, grammar=g, logprobs=True, top_logprobs=3)
    assert c.text == "".join(words) and c.stop_reason == "eog"
    prev = p[-1]
    for t in c.logprobs:
        check_exact(mtp_sm, prev, t.token, t.logprob, t.top_logprobs)
        prev = t.token


def test_stop_strings_keep_one_record_per_delivered_token(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 4)
    want = mtp_sm.greedy(p, 10)
    stop = mtp_sm.pieces[want.tokens[4]][2:4]       # begins inside the 5th token
    c = e.complete(p, max_tokens=10, temp=0, stop=stop, logprobs=True, top_logprobs=1)
    assert c.stop_reason == "stop_string"
    assert len(c.logprobs) == len(c.tokens) == 5     # the token the stop string begins in is delivered, cut
    assert [t.token for t in c.logprobs] == want.tokens[:5]
    assert c.text == mtp_sm.decode(want.tokens[:4]) + mtp_sm.pieces[want.tokens[4]][:2]
    assert c.logprobs[-1].text == mtp_sm.pieces[want.tokens[4]]      # the record has the whole token


def test_bad_logprob_options(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 2)
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        e.complete(p, top_logprobs=2)
    with pytest.raises(TypeError, match="logprobs"):
        e.complete(p, logprobs=1)
    with pytest.raises(ValueError, match="top_logprobs"):
        e.complete(p, logprobs=True, top_logprobs=21)
    with pytest.raises(ValueError, match="top_logprobs"):
        e.complete(p, logprobs=True, top_logprobs=-1)
    assert e.generate(p, max_tokens=2, temp=0) == mtp_sm.greedy(p, 2).text
