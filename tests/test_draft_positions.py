"""Acceptance by draft position: ``drafts_generated_by_pos`` / ``drafts_accepted_by_pos``.

Exact counts: the synthetic oracle says, for every verification, how many tokens were drafted
and how many of them accepted, so the counts at each position are known in advance -- per call
(``Completion.stats``, the done event) and cumulative (``stats()``), for ``MTP`` and ``Batch``.
"""
import threading

import pytest

import mtp_cy
from conftest import prompt_of


def oracle_by_pos(pred, k):
    gen, acc = [0] * k, [0] * k
    for n_gen, n_acc, _ in pred.steps:
        for i in range(n_gen):
            gen[i] += 1
            if i < n_acc:
                acc[i] += 1
    return gen, acc


def by_pos(st):
    return st["drafts_generated_by_pos"], st["drafts_accepted_by_pos"]


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_call_and_cumulative_counts_equal_the_oracle(mtp_model, mtp_sm, k):
    prompts = [prompt_of(mtp_sm, 3 + i, start=i) for i in range(3)]
    with mtp_cy.MTP(mtp_model, n_draft=k, n_ctx=256, n_threads=1) as m:
        tot_g, tot_a = [0] * k, [0] * k
        for p in prompts:
            c = m.complete(p, max_tokens=40, temp=0)
            want = oracle_by_pos(mtp_sm.predict(p, 40, k, n_ctx=256), k)
            assert by_pos(c.stats) == want
            tot_g = [a + b for a, b in zip(tot_g, want[0])]
            tot_a = [a + b for a, b in zip(tot_a, want[1])]
        st = m.stats()
        assert by_pos(st) == (tot_g, tot_a)
        assert sum(tot_g) == st["drafts_generated"] and sum(tot_a) == st["drafts_accepted"]
        # the done event carries the call's counts
        evs = list(m.stream_events(prompts[0], max_tokens=40, temp=0))
        assert by_pos(evs[-1][1]) == oracle_by_pos(mtp_sm.predict(prompts[0], 40, k, n_ctx=256), k)
        assert "acceptance by position" in m.print_stats()
        m.reset_stats()
        assert by_pos(m.stats()) == ([0] * k, [0] * k)


def test_batch_per_call_counts_whatever_runs_beside(mtp_model, mtp_sm):
    prompts = [prompt_of(mtp_sm, 3 + i % 3, start=i) for i in range(6)]
    lens = [20 + 5 * i for i in range(6)]
    out = [None] * 6
    with mtp_cy.Batch(mtp_model, n_seq=3, n_draft=3, n_ctx=3 * 256, n_threads=1) as b:
        def work(i):
            out[i] = b.complete(prompts[i], max_tokens=lens[i], temp=0)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        st = b.stats()
        assert "acceptance by position" in b.print_stats()
    tot = ([0] * 3, [0] * 3)
    for i, c in enumerate(out):
        want = oracle_by_pos(mtp_sm.predict(prompts[i], lens[i], 3, n_ctx=256), 3)
        assert by_pos(c.stats) == want, i
        for j in range(3):
            tot[0][j] += want[0][j]
            tot[1][j] += want[1][j]
    assert by_pos(st) == tot


def test_session_lists_no_positions(mtp_model, mtp_sm):
    with mtp_cy.Session(mtp_model, n_ctx=128, n_threads=1) as s:
        c = s.complete(prompt_of(mtp_sm, 3), max_tokens=5, temp=0)
        assert by_pos(c.stats) == ([], []) and by_pos(s.stats()) == ([], [])


def test_auto_lists_every_position_up_to_n_draft_max(mtp_model, mtp_sm):
    with mtp_cy.MTP(mtp_model, n_draft="auto", n_draft_max=5, n_ctx=256, n_threads=1) as m:
        m.generate(prompt_of(mtp_sm, 3), max_tokens=60, temp=0)
        g, a = by_pos(m.stats())
        assert len(g) == len(a) == 5
        assert all(x >= y for x, y in zip(g, a))
        assert all(g[i] >= g[i + 1] for i in range(4))          # a draft reaching i+2 also reached i+1
        assert sum(g) == m.stats()["drafts_generated"]
