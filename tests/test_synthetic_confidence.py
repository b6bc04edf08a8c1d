"""mtp_cy.synthetic draft probabilities: draft_confidence, SyntheticModel.draft_prob and
predict(p_min=...) against upstream's ``llama-speculative-simple --spec-draft-p-min``."""
import math

import numpy as np
import pytest

from mtp_cy import synthetic as syn

from synth_upstream import (COMPLETION, SPEC, _private_cache, check_upstream, gguf_tensors,  # noqa: F401
                            need, run_completion)


def draft_probs_from_weights(m):
    """Recompute every member's draft probability from the file's tensors: the MTP block's
    token path (token_embd -> enorm -> eh_proj -> RMS norm * shared_head_norm -> head; the
    block's layers only write scratch dims, which the heads ignore) and upstream's draft
    sampler (softmax of the top-10 logits).  Returns {member: (p, ranked token ids)}."""
    t = gguf_tensors(m.path if m.mtp_path is None else m.mtp_path)
    D = m.dims["n_embd"]
    blk = f"blk.{m.n_trunk}."
    head = t[blk + "nextn.shared_head_head.weight"] if m.mtp_head == "own" else t["output.weight"]
    head = head.astype(np.float64)
    eh = t[blk + "nextn.eh_proj.weight"].astype(np.float64)[:, :D]
    rms = lambda v: np.sqrt(np.mean(v * v) + 1e-6)  # noqa: E731  (rms_norm_eps 1e-6)
    out = {}
    for tok in m.token_ids:
        e = t["token_embd.weight"][tok].astype(np.float64)
        x = eh @ (e / rms(e) * t[blk + "nextn.enorm.weight"])
        h = x / rms(x) * t[blk + "nextn.shared_head_norm.weight"]
        logits = head @ h
        order = np.argsort(-logits, kind="stable")
        top = logits[order[:10]]
        out[tok] = (1.0 / np.exp(top - top[0]).sum(), [int(i) for i in order[:3]])
    return out


CONFIGS = [dict(mtp_head="own"), dict(mtp_head="shared"),
           dict(mtp_head="own", draft_confidence=0.58), dict(mtp_head="shared", draft_confidence=0.58),
           dict(mtp_head="shared", draft_confidence=0.9, eog_after="sea", acceptance=0.25),
           dict(mtp_head="own", draft_confidence=0.7, eog_after=3, acceptance=0.5),
           dict(mtp_head="shared", draft_confidence=0.55, arch="qwen35moe")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_draft_prob_matches_the_weights(tmp_path, cfg):
    m = syn.make_model(tmp_path / "m.gguf", **cfg)
    c = cfg.get("draft_confidence")
    from_w = draft_probs_from_weights(m)
    for tok in m.token_ids:
        p, ranked = from_w[tok]
        assert ranked[0] == m.g[tok] == m.draft_token(tok)
        assert abs(p - m.draft_prob(tok)) < 1e-5, (tok, p, m.draft_prob(tok))
        right = m.g[tok] == m.f[tok]
        if c is None:
            # defaults: own head certain; shared head: the runner-up 2 logits below
            want = 1 / (1 + 9 * math.exp(-20)) if cfg["mtp_head"] == "own" else \
                1 / (1 + math.exp(-2) + 8 * math.exp(-20))
            assert m.draft_prob(tok) == pytest.approx(want, abs=1e-12)
        elif right:
            assert m.draft_prob(tok) > 0.9999
        else:
            assert ranked[1] == m.f[tok]                 # unsure between its draft and the target's word
            assert abs(m.draft_prob(tok) - c) < 0.005
    # outside tokens behave like their member
    assert 50000 not in m.f and m.draft_prob(50000) == m.draft_prob(m.token_ids[50000 % m.n_words])


@pytest.mark.parametrize("head", ["own", "shared"])
def test_confidence_keeps_the_target(tmp_path, head):
    """draft_confidence changes the MTP head only: the target's tensors are bit-identical."""
    a = syn.make_model(tmp_path / "a.gguf", mtp_head=head, acceptance=0.5, seed=9)
    b = syn.make_model(tmp_path / "b.gguf", mtp_head=head, acceptance=0.5, seed=9, draft_confidence=0.6)
    ta, tb = gguf_tensors(a.path), gguf_tensors(b.path)
    assert set(ta) == set(tb)
    blk = f"blk.{a.n_trunk}."
    for n in ta:
        if not n.startswith(blk + "nextn."):
            assert np.array_equal(ta[n], tb[n]), n
    assert (a.f, a.g, a.runner_up) == (b.f, b.g, b.runner_up)
    unsure = [j for j, t in enumerate(a.token_ids) if a.g[t] != a.f[t]]
    changed = {"own": blk + "nextn.shared_head_head.weight", "shared": blk + "nextn.eh_proj.weight"}[head]
    neq = ta[changed] != tb[changed]
    # own: head rows; shared: eh_proj's embedding columns of the words (f16 vs f32 elsewhere)
    diff = np.nonzero(neq.any(axis=1) if head == "own" else neq[:, :a.n_words].any(axis=0))[0]
    if head == "own":      # rows of the targets' words f(t) of unsure members
        assert sorted(diff) == sorted(a.f[a.token_ids[j]] for j in unsure)
    else:                  # eh_proj columns of unsure members (stored f32, exact)
        assert sorted(diff) == unsure
        assert syn.load_oracle(b.path).draft_confidence == 0.6


def test_p_min_oracle(tmp_path):
    m = syn.make_model(tmp_path / "m.gguf", acceptance=0.5, draft_confidence=0.6)
    assert sorted({round(v, 2) for v in m.draft_p.values()}) == [0.6, 1.0]
    for rules in ("mtp_cy", "upstream"):
        for prompt in (m.encode("the sea"), m.encode("moon star tree")):
            for n_draft in (1, 3, 5):
                base = m.predict(prompt, 40, n_draft, rules=rules)
                assert m.predict(prompt, 40, n_draft, rules=rules, p_min=0.55) == base       # p_min <= p
                none = m.predict(prompt, 40, n_draft, rules=rules, p_min=1.0)               # p_min above all
                assert none.drafts_generated == 0 and none.tokens[:40] == base.tokens[:40]
                sure = m.predict(prompt, 40, n_draft, rules=rules, p_min=0.8)               # only right drafts
                assert sure.drafts_accepted == sure.drafts_generated > 0
                assert sure.drafts_generated < base.drafts_generated
                assert sure.tokens[:40] == base.tokens[:40] == m.greedy(prompt, 40).tokens
    # drafting stops *before* the first unsure draft: hand check of one chain
    t = next(t for t in m.token_ids if m.g[t] == m.f[t] and m.g[m.g[t]] != m.f[m.g[t]])
    assert m._chain(t, 4, 0.8) == [m.g[t]] and m._chain(t, 4, 0.0)[:2] == [m.g[t], m.g[m.g[t]]]
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(ValueError, match="p_min"):
            m.predict(m.encode("the sea"), 5, 3, p_min=bad)


def p_min_values_safe(m, p_mins):
    """The test's p_min values are not within 0.005 of a draft probability (whose last digits
    depend on a common logit factor 1 +- 1e-4)."""
    for pm in p_mins:
        assert min(abs(pm - p) for p in m.draft_p.values()) > 0.005, pm


# ---------------------------------------------------------------- upstream

UP = [(dict(mtp_head="own", acceptance=0.5, draft_confidence=0.58), (0.5, 0.8)),
      pytest.param(dict(mtp_head="shared", acceptance=0.75, draft_confidence=0.58), (0.5, 0.8),
                   marks=pytest.mark.slow),
      pytest.param(dict(mtp_head="shared", acceptance=0.75), (0.8, 0.9), marks=pytest.mark.slow)]


@pytest.mark.parametrize("cfg, p_mins", UP, ids=["own-c0.58", "shared-c0.58", "shared-default"])
def test_upstream_p_min(cfg, p_mins):
    need(SPEC)
    m = syn.cached_model(**cfg)
    p_min_values_safe(m, p_mins)
    for p_min in p_mins:
        for words, n_draft in (("the sea", 2), ("moon star tree", 4)):
            check_upstream(m, m.encode(words), n_draft, 24, p_min=p_min)


def test_upstream_confidence_greedy_unchanged():
    need(COMPLETION)
    m = syn.cached_model(mtp_head="shared", acceptance=0.5, draft_confidence=0.6)
    prompt = m.encode("the sea")
    assert run_completion(m, prompt, 30) == m.greedy(prompt, 30).text


SLOW = [dict(mtp_head=h, acceptance=a, draft_confidence=c)
        for h in ("own", "shared") for a, c in ((0.25, 0.55), (0.5, 0.7), (1.0, 0.95))] + \
       [dict(mtp_head="shared", acceptance=0.5, draft_confidence=0.7, arch="qwen35moe")]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", SLOW, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_upstream_p_min_matrix(cfg):
    need(SPEC)
    m = syn.cached_model(**cfg)
    p_mins = (0.3, 0.5, 0.62, 0.8, 0.99)
    p_min_values_safe(m, p_mins)
    for p_min in p_mins:
        for words, n_draft in (("the sea", 1), ("moon star tree", 4)):
            check_upstream(m, m.encode(words), n_draft, 24, p_min=p_min)


@pytest.mark.slow
def test_upstream_p_min_sidecar_and_eog():
    need(SPEC)
    m = syn.cached_model(layout="sidecar", mtp_head="shared", acceptance=0.5, draft_confidence=0.6,
                         eog_after="sea", seed=3)
    from synth_upstream import cycle_back
    stops = []
    for off, n_draft, p_min in ((2, 3, 0.5), (4, 3, 0.8), (6, 4, 0.5), (3, 2, 0.8)):
        prompt = [m.token_ids[2], cycle_back(m, m.eog_after, off)]
        stops.append(check_upstream(m, prompt, n_draft, 24, p_min=p_min, md=m.mtp_path).stop)
    assert stops == ["eog"] * 4
