"""MTP on mixture-of-experts models (qwen35moe, the architecture of Qwen3.5/3.6-35B-A3B):
the behaviours that matter, on synthetic MoE models whose predictions stay exact whatever
the router picks (routed experts and the shared expert only write scratch dimensions)."""
import threading

import pytest

import mtp_cy
from conftest import counters, expected, prompt_of

def moe(synthetic, **kw):
    return synthetic.cached_model(arch="qwen35moe", **kw)


@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("head", ["own", "shared"])
def test_lossless_and_exact_stats(synthetic, acceptance, head):
    sm = moe(synthetic, acceptance=acceptance, mtp_head=head)
    with mtp_cy.Model(sm.path) as model, mtp_cy.Session(model, n_ctx=256) as plain:
        assert model.arch == "qwen35moe" and model.has_mtp
        for n_draft in (1, 2, 3, 4):
            p = prompt_of(sm, 1 + n_draft, start=3 * n_draft)
            want = sm.predict(p, 24, n_draft, n_ctx=256)
            assert want.tokens == sm.greedy(p, 24).tokens
            with mtp_cy.MTP(model, n_draft=n_draft, n_ctx=256) as m:
                assert m.generate(p, max_tokens=24, temp=0) == want.text == plain.generate(p, max_tokens=24,
                                                                                            temp=0)
                assert counters(m.stats()) == expected(want), (n_draft, acceptance, head)


def test_eog_inside_a_verified_batch(synthetic):
    sm = moe(synthetic, acceptance=1.0, eog_after="sea", seed=3)
    inv = {v: k for k, v in sm.f.items()}
    with mtp_cy.Model(sm.path) as model, mtp_cy.MTP(model, n_draft=4, n_ctx=256) as m:
        for off in (1, 2, 3, 5):
            t = sm.eog_after
            for _ in range(off):
                t = inv[t]
            p = [sm.token_ids[2], t]
            want = sm.predict(p, 40, 4, n_ctx=256)
            assert want.stop == "eog"
            m.reset_stats()
            events = list(m.stream_events(p, max_tokens=40, temp=0))
            assert events[-1] == ("eog", None)
            assert [e[1] for e in events if e[0] == "token"] == want.tokens
            assert counters(m.stats()) == expected(want)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 16])
def test_exact_max_tokens(synthetic, max_tokens):
    sm = moe(synthetic, acceptance=0.75)
    with mtp_cy.Model(sm.path) as model, mtp_cy.MTP(model, n_draft=4, n_ctx=128) as m:
        p = prompt_of(sm, 2, start=max_tokens)
        events = list(m.stream_events(p, max_tokens=max_tokens, temp=0))
        toks = [e[1] for e in events if e[0] == "token"]
        want = sm.predict(p, max_tokens, 4, n_ctx=128)
        assert toks == want.tokens and len(toks) == max_tokens
        assert counters(m.stats()) == expected(want)


def test_context_limits_and_auto(synthetic):
    sm = moe(synthetic, acceptance=0.75)
    with mtp_cy.Model(sm.path) as model, mtp_cy.Session(model, n_ctx=24) as plain:
        for nd in (3, "auto"):
            with mtp_cy.MTP(model, n_draft=nd, n_ctx=24) as m:
                for n in (1, 5, 22, 23):
                    p = prompt_of(sm, n)
                    s = m.stream(p, max_tokens=100, temp=0)
                    assert "".join(s) == plain.generate(p, max_tokens=100, temp=0)
                    assert s.stop_reason == "ctx_full"


def test_cancel_and_prompt_cache(synthetic):
    sm = moe(synthetic, acceptance=0.75)
    with mtp_cy.Model(sm.path) as model, mtp_cy.MTP(model, n_draft=3, n_ctx=4096, n_threads=1) as m:
        # cancel from another thread mid-stream (deterministic: the stream waits for it)
        it = m.stream(prompt_of(sm, 3000), max_tokens=50, temp=0)
        first = next(it)
        t = threading.Thread(target=m.cancel)
        t.start()
        t.join()
        rest = list(it)
        assert it.stop_reason == "cancelled" and len((first + "".join(rest)).split()) < 50
        p = prompt_of(sm, 9)
        g1 = m.generate(p, max_tokens=12, temp=0)
        assert g1 == sm.greedy(p, 12).text
        p2 = p + sm.greedy(p, 12).tokens + prompt_of(sm, 3, start=7)
        c = m.complete(p2, max_tokens=10, temp=0)
        assert c.usage.cached_tokens == len(p) + 11
        with mtp_cy.MTP(model, n_draft=3, n_ctx=4096) as fresh:
            f = fresh.complete(p2, max_tokens=10, temp=0)
        assert (c.tokens, counters(c.stats)) == (f.tokens, counters(f.stats))
