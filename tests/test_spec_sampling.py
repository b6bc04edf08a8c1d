"""Speculative (rejection) sampling: MTP keeps the target's distribution exactly when sampling.

The model (``synthetic.cached_model(spread=4)``) gives every word four plausible successors
(logits 0, -0.5, -1, -1.5) and its MTP head a distribution of its own over them (other gaps,
and half of the time another favourite), so the head's q differs from the target's p and a
wrong implementation shows.  The target's next token depends on the current token only, so
the exact distribution of the first tokens of a call is a product of one-step distributions,
computed here from the target's own logits (``logprobs`` of a plain session) with llama.cpp's
sampler chain order (top-k, top-p, min-p on the raw logits, then the temperature).

Each case draws the first ``L`` tokens of many seeded calls and checks
* goodness of fit against those exact probabilities (chi-square), and
* homogeneity against plain decoding (``Session``) with the same settings,
for MTP with both rules and for ``Batch``.  The thresholds (p < 1e-4) fail a biased sampler:
``test_the_check_catches_a_biased_sampler`` runs the same check on samples of the same size
drawn by the textbook mistake (on a rejection, draw from p instead of the residual) and must
reject them.
"""
import math
import random
import threading
from collections import Counter

import pytest

import mtp_cy
from conftest import make_engine

L = 3                 # tokens per call looked at
ALPHA = 1e-4          # a check fails below this p-value


# -- statistics (no scipy: chi-square tail by the Wilson-Hilferty approximation) --------------
def chi2_sf(x, df):
    if df <= 0:
        return 1.0
    z = ((x / df) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * df))) / math.sqrt(2.0 / (9.0 * df))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def gof_pvalue(counts, probs, n):
    """Chi-square goodness of fit of `counts` (Counter of outcomes) to `probs` (dict), categories
    with an expected count below 5 pooled."""
    cats = sorted(probs, key=lambda c: -probs[c])
    obs, exp = [], []
    pool_o, pool_e = 0, 0.0
    for c in cats:
        e = probs[c] * n
        if e >= 5:
            obs.append(counts.get(c, 0))
            exp.append(e)
        else:
            pool_o += counts.get(c, 0)
            pool_e += e
    pool_o += sum(v for c, v in counts.items() if c not in probs)
    pool_e += max(0.0, n - sum(probs.values()) * n)
    if pool_e >= 1e-9:
        obs.append(pool_o)
        exp.append(max(pool_e, 1e-9))
    elif pool_o:
        return 0.0                          # an outcome the exact distribution rules out
    x = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return chi2_sf(x, len(obs) - 1)


def homogeneity_pvalue(a, b):
    """Two-sample chi-square test that Counters a and b come from one distribution."""
    na, nb = sum(a.values()), sum(b.values())
    cats = sorted(set(a) | set(b), key=lambda c: -(a.get(c, 0) + b.get(c, 0)))
    rows, pa, pb = [], 0, 0
    for c in cats:
        t = a.get(c, 0) + b.get(c, 0)
        if t * min(na, nb) / (na + nb) >= 5:
            rows.append((a.get(c, 0), b.get(c, 0)))
        else:
            pa += a.get(c, 0)
            pb += b.get(c, 0)
    if pa + pb:
        rows.append((pa, pb))
    x = 0.0
    for oa, ob in rows:
        t = oa + ob
        ea, eb = t * na / (na + nb), t * nb / (na + nb)
        x += (oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb
    return chi2_sf(x, len(rows) - 1)


# -- the exact distribution -----------------------------------------------------------------
def chain(logits, temp, top_k=0, top_p=1.0, min_p=0.0):
    """llama.cpp's chain on {token: logit}: top-k, top-p, min-p (raw logits), temperature."""
    items = sorted(logits.items(), key=lambda kv: -kv[1])
    if top_k > 0:
        items = items[:top_k]
    if top_p < 1.0:
        m = items[0][1]
        w = [math.exp(v - m) for _, v in items]
        s = sum(w)
        cum, keep = 0.0, 0
        for x in w:
            cum += x / s
            keep += 1
            if cum >= top_p:
                break
        items = items[:keep]
    if min_p > 0.0:
        m = items[0][1]
        items = [(t, v) for t, v in items if v >= m + math.log(min_p)]
    m = items[0][1]
    w = {t: math.exp((v - m) / temp) for t, v in items}
    s = sum(w.values())
    return {t: x / s for t, x in w.items()}


class Exact:
    """One-step distributions of the target (from its logprobs) and the joint of L steps."""

    def __init__(self, session):
        self.s = session
        self.lp = {}

    def logits(self, tok):
        if tok not in self.lp:
            c = self.s.complete([tok], max_tokens=1, temp=0, logprobs=True, top_logprobs=20)
            self.lp[tok] = dict(c.logprobs[0].top_logprobs)
        return self.lp[tok]

    def joint(self, first, n, **sampler):
        out = {(): 1.0}
        for _ in range(n):
            nxt = {}
            for seq, pr in out.items():
                cur = seq[-1] if seq else first
                for t, q in chain(self.logits(cur), **sampler).items():
                    if pr * q > 1e-12:
                        nxt[seq + (t,)] = pr * q
            out = nxt
        return out


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spread_sm(synthetic):
    return synthetic.cached_model(mtp=True, acceptance=0.5, spread=4)


@pytest.fixture(scope="module")
def spread_model(spread_sm):
    m = mtp_cy.Model(spread_sm.path)
    yield m
    m.close()


@pytest.fixture(scope="module")
def plain(spread_model):
    with mtp_cy.Session(spread_model, n_ctx=128, n_threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def exact(plain):
    return Exact(plain)


def draw(engine, prompt, n, seed0=0, **opts):
    c = Counter()
    for i in range(n):
        out = engine.complete(prompt, max_tokens=L, seed=seed0 + i, **opts)
        c[tuple(out.tokens[:L])] += 1
    return c


_REFERENCE = {}


def reference(plain, prompt, n, **opts):
    """Plain decoding's first tokens over n seeds (drawn once per setting, shared by the tests)."""
    key = (tuple(prompt), n, tuple(sorted(opts.items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = draw(plain, prompt, n, seed0=10**6, **opts)
    return _REFERENCE[key]


def unfiltered(**sampler):
    """The sampler settings with top-k / top-p / min-p off unless `sampler` sets them."""
    return dict(dict(top_k=0, top_p=1.0, min_p=0.0), **sampler)


def assert_lossless(got, prompt, n, exact, plain, sampler, why=None):
    """`got` (first tokens of n calls) fits the exact distribution and plain decoding's samples."""
    assert gof_pvalue(got, exact.joint(prompt[-1], L, **sampler), n) > ALPHA, why
    assert homogeneity_pvalue(got, reference(plain, prompt, n, **sampler)) > ALPHA, why


FAST = [dict(temp=1.0), dict(temp=0.7, top_k=3)]
FAST_IDS = ["temp1", "temp0.7-topk3"]


@pytest.mark.parametrize("sampler", FAST, ids=FAST_IDS)
@pytest.mark.parametrize("rule", ["rejection", "match"])
def test_mtp_first_tokens_follow_the_target_distribution(spread_sm, spread_model, plain, exact, sampler, rule):
    prompt = [spread_sm.token_ids[0]]
    n = 1500
    full = unfiltered(**sampler)
    with mtp_cy.MTP(spread_model, n_draft=3, n_ctx=128, n_threads=1) as m:
        got = draw(m, prompt, n, spec_sampling=rule, **full)
        assert m.stats()["drafts_generated"] > 0
    assert_lossless(got, prompt, n, exact, plain, full, (rule, sampler))


def test_batch_rejection_follows_the_target_distribution(spread_sm, spread_model, exact):
    prompt = [spread_sm.token_ids[1]]
    n = 1200
    full = unfiltered(temp=0.8)
    want = exact.joint(prompt[-1], L, **full)
    got = Counter()
    with mtp_cy.Batch(spread_model, n_seq=2, n_draft=3, n_ctx=256, n_threads=1) as b:
        def work(off):
            for i in range(off, n, 2):
                c = b.complete(prompt, max_tokens=L, seed=i, **full)
                got[tuple(c.tokens[:L])] += 1
        ts = [threading.Thread(target=work, args=(j,)) for j in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(300)
        assert b.stats()["drafts_generated"] > 0
    assert sum(got.values()) == n
    assert gof_pvalue(got, want, n) > ALPHA


def test_the_check_catches_a_biased_sampler(spread_sm, exact):
    """The same check, on samples of the size the tests use, rejects the classic mistake of
    drawing from p (instead of the residual max(0, p - q)) after a rejected draft token, and
    accepts the correct algorithm: the tests above can fail."""
    rng = random.Random(7)
    first = spread_sm.token_ids[0]
    full = unfiltered(temp=1.0)
    want = exact.joint(first, L, **full)

    def pick(d):
        r, run = rng.random() * sum(d.values()), 0.0
        for t, v in d.items():
            run += v
            if run > r:
                return t
        return t

    def step(p, biased):
        # a head that ranks the target's (plausible) candidates the other way round
        toks = sorted((t for t in p if p[t] > 1e-6), key=lambda t: p[t])
        q = {t: p[u] for t, u in zip(toks, reversed(toks))}
        x = pick(q)
        if rng.random() * q[x] < p[x]:
            return x
        if biased:
            return pick(p)
        res = {t: max(0.0, p[t] - q.get(t, 0.0)) for t in p}
        return pick(res)

    def sample(biased, n=1500):
        c = Counter()
        for _ in range(n):
            seq, cur = (), first
            for _ in range(L):
                cur = step(chain(exact.logits(cur), **full), biased)
                seq += (cur,)
            c[seq] += 1
        return c

    assert gof_pvalue(sample(False), want, 1500) > ALPHA
    assert gof_pvalue(sample(True), want, 1500) < ALPHA


def test_rejection_accepts_more_than_match_when_sampling(spread_sm, spread_model):
    prompt = [spread_sm.token_ids[2]]
    rate = {}
    with mtp_cy.MTP(spread_model, n_draft=2, n_ctx=256, n_threads=1) as m:
        for rule in ("match", "rejection"):
            m.reset_stats()
            for seed in range(60):
                m.complete(prompt, max_tokens=16, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                           spec_sampling=rule)
            st = m.stats()
            rate[rule] = st["acceptance_rate"]
            g, a = st["drafts_generated_by_pos"], st["drafts_accepted_by_pos"]
            assert sum(g) == st["drafts_generated"] and sum(a) == st["drafts_accepted"]
    assert rate["rejection"] > rate["match"] + 0.1, rate


def test_seeded_calls_are_reproducible_and_batch_neighbours_do_not_matter(spread_sm, spread_model):
    prompt = [spread_sm.token_ids[3], spread_sm.token_ids[4]]
    opts = dict(max_tokens=24, temp=0.9, top_k=0, top_p=1.0, min_p=0.0, spec_sampling="rejection")
    with mtp_cy.MTP(spread_model, n_draft=3, n_ctx=256, n_threads=1) as m:
        a = m.complete(prompt, seed=123, **opts)
        b = m.complete(prompt, seed=123, **opts)
        other = m.complete(prompt, seed=124, **opts)
        free = [m.complete(prompt, **opts).tokens for _ in range(2)]
    assert a.tokens == b.tokens and a.stats["spec_sampling"] == "rejection"
    assert other.tokens != a.tokens            # the seed matters (24 tokens over 4 candidates)
    assert free[0] != free[1]                  # seed=None: a random seed per call, not a fixed one
    # a Batch call gives the text of a lone MTP call with the same seed and n_draft, whatever runs beside
    out = {}
    with mtp_cy.Batch(spread_model, n_seq=3, n_draft=3, n_ctx=3 * 256, n_threads=1) as bt:
        def work(i):
            out[i] = bt.complete(prompt if i == 0 else [spread_sm.token_ids[i]], seed=123 if i == 0 else i, **opts)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
    assert out[0].tokens == a.tokens
    assert out[0].stats["drafts_generated_by_pos"] == a.stats["drafts_generated_by_pos"]


def test_logprobs_stop_and_max_tokens_as_without_mtp(spread_sm, spread_model, exact):
    prompt = [spread_sm.token_ids[5]]
    with mtp_cy.MTP(spread_model, n_draft=3, n_ctx=256, n_threads=1) as m:
        c = m.complete(prompt, max_tokens=13, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5,
                       logprobs=True, spec_sampling="rejection")
        assert len(c.tokens) == 13 and c.finish_reason == "length"
        prev = prompt[-1]
        for t, lp in zip(c.tokens, c.logprobs):
            # the target's own log-probability of the token after the one before it (the
            # synthetic logits move by ~1e-4 with the position: scratch noise in the trunk)
            assert lp.logprob == pytest.approx(exact.logits(prev)[t], abs=2e-3)
            prev = t
        word = spread_sm.pieces[c.tokens[4]]
        d = m.complete(prompt, max_tokens=13, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5, stop=[word],
                       spec_sampling="rejection")
        assert d.finish_reason == "stop" and word not in d.text and c.text.startswith(d.text)


def test_greedy_is_unchanged_and_exact(spread_sm, spread_model, mtp_sm, mtp_model):
    for sm, model in ((spread_sm, spread_model), (mtp_sm, mtp_model)):
        prompt = [sm.token_ids[0], sm.token_ids[1]]
        want = sm.predict(prompt, 40, 3, n_ctx=256)
        with mtp_cy.MTP(model, n_draft=3, n_ctx=256, n_threads=1, spec_sampling="rejection") as m:
            c = m.complete(prompt, max_tokens=40, temp=0)
        assert c.tokens == want.tokens
        assert c.stats["drafts_accepted"] == want.drafts_accepted and c.stats["spec_sampling"] == "match"


def test_p_min_cuts_drafts_the_head_is_unsure_of(spread_sm, spread_model):
    """Under rejection sampling p_min compares the drawn token's probability under the head's
    distribution: the spread head never gives a token 0.99, so nothing is drafted, while a low
    p_min still drafts."""
    prompt = [spread_sm.token_ids[10]]
    opts = dict(unfiltered(temp=1.0), max_tokens=20, spec_sampling="rejection")
    gen = {}
    for p_min in (0.0, 0.05, 0.99):
        with mtp_cy.MTP(spread_model, n_draft=2, p_min=p_min, n_ctx=256, n_threads=1) as m:
            for seed in range(5):
                m.complete(prompt, seed=seed, **opts)
            gen[p_min] = m.stats()["drafts_generated"]
    assert gen[0.99] == 0 and gen[0.0] > 0 and gen[0.05] > 0


def test_auto_learns_the_acceptance_of_the_sampler_in_use(spread_sm, spread_model):
    prompt = [spread_sm.token_ids[9]]
    with mtp_cy.MTP(spread_model, n_draft="auto", n_ctx=512, n_threads=1) as m:
        m.complete(prompt, max_tokens=200, temp=0)
        pol = m.stats()["policy"]
        assert pol["learned_under"] == {"spec_sampling": "match", "temp": 0.0}
        assert pol["observed_by_position"][1] > 4            # the measuring passes drafted
        m.complete(prompt, max_tokens=4, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)
        pol = m.stats()["policy"]
        assert pol["learned_under"] == {"spec_sampling": "rejection", "temp": 1.0}
        # what was learned greedily is gone: a 4-token call observes at most 3 first positions
        assert pol["observed_by_position"][1] <= 3
        before = pol["observed_by_position"][1]
        m.complete(prompt, max_tokens=4, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=2)
        pol = m.stats()["policy"]
        assert pol["learned_under"]["temp"] == 1.0
        assert pol["observed_by_position"][1] >= before * 0.9   # the same settings: kept, not reset


def test_bad_spec_sampling_is_refused(spread_model, plain):
    with pytest.raises(ValueError, match="spec_sampling"):
        mtp_cy.MTP(spread_model, n_ctx=128, spec_sampling="greedy")
    with pytest.raises(TypeError, match="spec_sampling"):
        mtp_cy.Batch(spread_model, n_seq=1, n_ctx=128, spec_sampling=1)
    with mtp_cy.MTP(spread_model, n_draft=2, n_ctx=128, n_threads=1, spec_sampling="match") as m:
        with pytest.raises(ValueError, match="spec_sampling"):
            m.complete([5], max_tokens=2, spec_sampling="exact")
        # the session default, and a call that overrides it
        assert m.complete([5], max_tokens=2, temp=0.8, seed=1).stats["spec_sampling"] == "match"
        c = m.complete([5], max_tokens=2, temp=0.8, seed=1, spec_sampling="rejection")
        assert c.stats["spec_sampling"] == "rejection"
    # a Session does not draft: the option is accepted and changes nothing
    assert plain.complete([5], max_tokens=3, temp=0.8, seed=3, spec_sampling="rejection").tokens == \
        plain.complete([5], max_tokens=3, temp=0.8, seed=3).tokens


# -- the slow tier: more sampler settings, penalties and a grammar ----------------------------
SLOW = [dict(temp=1.0, top_p=0.8), dict(temp=1.3, min_p=0.3), dict(temp=0.5), dict(temp=1.0, top_k=2, top_p=0.9)]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SLOW, ids=[str(s) for s in SLOW])
@pytest.mark.parametrize("kind", ["mtp", "batch"])
def test_more_samplers_follow_the_target_distribution(spread_sm, spread_model, plain, exact, sampler, kind):
    prompt = [spread_sm.token_ids[6]]
    n = 2000
    full = unfiltered(**sampler)
    with make_engine(kind, spread_model, n_draft=2, n_ctx=128, n_threads=1) as eng:
        got = draw(eng, prompt, n, **full)
    assert_lossless(got, prompt, n, exact, plain, full, (kind, sampler))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["penalties", "grammar"])
@pytest.mark.parametrize("rule", ["rejection", "match"])
def test_penalties_and_grammar_as_plain_sampling(spread_sm, spread_model, plain, case, rule):
    prompt = [spread_sm.token_ids[7], spread_sm.token_ids[8]]
    n = 2000
    opts = unfiltered(temp=1.0)
    if case == "penalties":
        opts.update(penalty_repeat=1.6, penalty_present=0.4, penalty_last_n=8)
    else:
        words = [spread_sm.pieces[t] for t in spread_sm.token_ids[:12]]
        opts["grammar"] = "root ::= w w w\nw ::= " + " | ".join('"%s"' % w for w in words) + "\n"
    with mtp_cy.MTP(spread_model, n_draft=3, n_ctx=128, n_threads=1) as m:
        got = draw(m, prompt, n, spec_sampling=rule, **opts)
    ref = reference(plain, prompt, n, **opts)
    assert homogeneity_pvalue(got, ref) > ALPHA
    if case == "grammar":
        allowed = set(spread_sm.token_ids[:12])
        assert all(set(k) <= allowed for k in got)
