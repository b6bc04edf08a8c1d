"""MTP(n_draft="auto") and p_min on real (synthetic) models: whatever the policy chooses,
the output is exactly plain decoding's; the statistics show what it did."""
import pytest

import mtp_cy
from conftest import prompt_of


@pytest.mark.parametrize("cfg", [dict(acceptance=0.0), dict(acceptance=0.5, mtp_head="shared"),
                                 dict(acceptance=1.0), dict(acceptance=0.75, eog_after="sea", seed=3)],
                         ids=["acc0", "acc0.5-shared", "acc1", "eog"])
@pytest.mark.parametrize("k_max", [1, 4, 8])
def test_auto_is_lossless(synthetic, cfg, k_max):
    sm = synthetic.cached_model(**cfg)
    with mtp_cy.Model(sm.path) as model, mtp_cy.Session(model, n_ctx=512) as plain, \
            mtp_cy.MTP(model, n_draft="auto", n_draft_max=k_max, n_ctx=512) as m:
        for i, n in enumerate((3, 1, 9, 3)):
            p = prompt_of(sm, n, start=5 * i)
            want = plain.generate(p, max_tokens=60, temp=0)
            assert m.generate(p, max_tokens=60, temp=0) == want
        st = m.stats()
        pol = st["policy"]
        assert st["n_draft"] == "auto" and m.n_draft == "auto" and m.n_draft_max == k_max
        assert sum(pol["chosen"].values()) == pol["iterations"] == st["iters"]
        assert set(pol["chosen"]) == set(range(k_max + 1))
        assert 0 <= pol["current"] <= k_max
        assert set(pol["acceptance_by_position"]) == set(range(1, k_max + 1))
        assert st["drafts_generated"] <= k_max * st["iters"]


def test_auto_exact_max_tokens_and_events(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft="auto", n_ctx=256) as m:
        for mt in (1, 2, 5, 33):
            events = list(m.stream_events(prompt_of(mtp_sm, 3), max_tokens=mt, temp=0))
            toks = [e[1] for e in events if e[0] == "token"]
            assert toks == mtp_sm.greedy(prompt_of(mtp_sm, 3), mt).tokens
            assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "max_tokens"


def test_auto_at_the_context_edge(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft="auto", n_ctx=20) as m, mtp_cy.Session(mtp_model, n_ctx=20) as plain:
        for n in (1, 5, 18, 19):
            p = prompt_of(mtp_sm, n)
            a = m.stream(p, max_tokens=100, temp=0)
            assert "".join(a) == plain.generate(p, max_tokens=100, temp=0)
            assert a.stop_reason == "ctx_full"


def test_auto_seeded_sampling_matches_plain(mtp_model, mtp_sm):
    # the exact-match rule draws every token with the call's own sampler, so a seeded call's
    # text does not depend on the draft lengths (rejection sampling keeps the distribution,
    # not the text: tests/test_spec_sampling.py)
    opts = dict(max_tokens=40, temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=11, spec_sampling="match")
    p = prompt_of(mtp_sm, 4)
    with mtp_cy.MTP(mtp_model, n_draft="auto") as m, mtp_cy.MTP(mtp_model, n_draft=2) as f:
        assert m.generate(p, **opts) == f.generate(p, **opts)


def test_reset_policy_and_repr(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft="auto") as m:
        m.generate(prompt_of(mtp_sm, 3), max_tokens=30, temp=0)
        assert m.stats()["policy"]["iterations"] > 0
        m.reset_policy()
        assert m.stats()["policy"]["iterations"] == 0
        assert "n_draft='auto'" in repr(m)
    with mtp_cy.MTP(mtp_model, n_draft=3) as m:
        assert "policy" not in m.stats() and m.stats()["n_draft"] == 3
    with pytest.raises(mtp_cy.ClosedError):
        m.reset_policy()


@pytest.mark.parametrize("p_min", [0.0, 0.5, 0.99, 1.0])
def test_p_min_is_lossless(mtp_model, mtp_sm, p_min):
    with mtp_cy.MTP(mtp_model, n_draft=4, p_min=p_min) as m, mtp_cy.Session(mtp_model) as plain:
        p = prompt_of(mtp_sm, 3)
        assert m.generate(p, max_tokens=50, temp=0) == plain.generate(p, max_tokens=50, temp=0)
        st = m.stats()
        assert st["p_min"] == pytest.approx(p_min)
        if p_min >= 1.0:
            # a probability is never above 1 and the synthetic head is never exactly sure
            assert st["drafts_generated"] <= st["iters"] * 4


def test_bad_auto_options(mtp_model):
    for bad in (0, 17, "4", 2.5):
        with pytest.raises((ValueError, TypeError), match="n_draft_max"):
            mtp_cy.MTP(mtp_model, n_draft="auto", n_draft_max=bad)
    # a verification batch of n_draft_max + 1 tokens must fit one ubatch
    with pytest.raises(ValueError, match=r"n_draft \+ 2 = 10"):
        mtp_cy.MTP(mtp_model, n_draft="auto", n_draft_max=8, n_ubatch=6)


@pytest.mark.parametrize("k_max", [2, 4])
def test_auto_learns_the_drafts_confidence(synthetic, k_max):
    """On a model whose MTP head is unsure exactly where it is wrong, auto calibrates the
    draft's confidence (wrong drafts are never accepted, sure ones are) and stays lossless
    whatever cut that makes it draft under.  (Drafting never pays on this tiny model: what
    auto learns comes from its measuring passes, so half of the drafts are wrong.)"""
    sm = synthetic.cached_model(acceptance=0.5, draft_confidence=0.58)
    unsure, sure = min(sm.draft_p.values()), max(sm.draft_p.values())
    assert unsure < 0.6 < 0.99 < sure
    with mtp_cy.Model(sm.path) as model, mtp_cy.Session(model, n_ctx=512) as plain, \
            mtp_cy.MTP(model, n_draft="auto", n_draft_max=k_max, n_ctx=512) as m:
        for i, n in enumerate((3, 1, 9)):
            p = prompt_of(sm, n, start=5 * i)
            assert m.generate(p, max_tokens=80, temp=0) == plain.generate(p, max_tokens=80, temp=0)
        cut = m.stats()["policy"]["confidence_cut"]
        cal = cut["calibration"]
        assert set(cal) == {round(b / 20, 2) for b in range(20)}
        bucket = lambda p: round(min(int(p * 20), 19) / 20, 2)  # noqa: E731
        prior = lambda p: (min(int(p * 20), 19) + 0.5) / 20     # noqa: E731
        assert cal[bucket(unsure)] < prior(unsure) - 0.1        # learned: unsure drafts fail
        assert cal[bucket(sure)] > prior(sure)                  # ... sure ones are accepted
        assert isinstance(cut["active"], bool) and 0.0 <= cut["p_min"] <= 1.0
        assert cut["break_even"] >= 0.0 and set(cut["pass_by_position"]) == set(range(1, k_max + 1))
