"""CPU thread pools shared by the sessions of a process, the FIFO CPU lock, idle pools paused.

Before: each session owned a pool whose helper threads went on polling for ~170 ms after every
call (the pause mtp_cy asked for was a no-op: the CPU backend did not expose it), so the next
call of any other session shared the cores with a spinner, and two sessions used at once ran
two pools on the same cores.  These tests check the mechanism (which pools exist, that an idle
process burns no CPU, that concurrent sessions stay exact); the speed is measured by
benchmarks/bench_switch.py, not here.
"""
import os
import threading
import time

import pytest

import mtp_cy

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs at least 2 CPUs for a pool with a helper thread")


def idle_cpu_seconds(window=0.4):
    """CPU seconds this whole process uses while the calling thread sleeps ``window`` seconds."""
    t0 = os.times()
    time.sleep(window)
    t1 = os.times()
    return (t1.user - t0.user) + (t1.system - t0.system)


@pytest.mark.parametrize("kind", ["session", "mtp"])
def test_no_thread_polls_after_a_call(mtp_model, mtp_sm, kind):
    from conftest import make_engine
    assert mtp_cy.cpu_pools()["can_pause"]
    with make_engine(kind, mtp_model, n_ctx=256, n_threads=2) as e:
        p = mtp_sm.token_ids[:3]
        for _ in range(3):
            assert e.generate(p, max_tokens=64, temp=0) == mtp_sm.greedy(p, 64).text
            # a helper still polling would burn ~0.1-0.2 s of CPU in this window
            assert idle_cpu_seconds() < 0.06
        # also after a stream left half-way (closed, not exhausted)
        it = e.stream(p, max_tokens=64, temp=0)
        next(it)
        it.close()
        assert idle_cpu_seconds() < 0.06


def test_sessions_share_one_pool_per_thread_count(mtp_model):
    base = mtp_cy.cpu_pools()["pools"]
    a = mtp_cy.Session(mtp_model, n_ctx=128, n_threads=2)
    b = mtp_cy.MTP(mtp_model, n_draft=2, n_ctx=128, n_threads=2)
    info = mtp_cy.cpu_pools()
    assert info["pools"] == base + 1
    c = mtp_cy.Session(mtp_model, n_ctx=128, n_threads=1)
    assert mtp_cy.cpu_pools()["pools"] == base + 2
    paused = mtp_cy.cpu_pools()["pauses"]
    a.generate([1, 2], max_tokens=4, temp=0)
    b.generate([1, 2], max_tokens=4, temp=0)
    assert mtp_cy.cpu_pools()["pauses"] > paused
    for e in (a, b, c):
        e.close()
    assert mtp_cy.cpu_pools()["pools"] == base          # the last user frees its pool


@pytest.mark.parametrize("n_threads", [None, 2])
def test_concurrent_sessions_are_exact_and_take_turns(mtp_model, mtp_sm, n_threads):
    """Four sessions (Session and MTP) generating in four threads at once: every text equals
    the oracle's, none waits forever, and the process is idle afterwards."""
    kw = {} if n_threads is None else {"n_threads": n_threads}
    engines = [mtp_cy.Session(mtp_model, n_ctx=256, **kw), mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=256, **kw),
               mtp_cy.Session(mtp_model, n_ctx=256, **kw), mtp_cy.MTP(mtp_model, n_draft=1, n_ctx=256, **kw)]
    out, errors = {}, []
    prompts = [mtp_sm.token_ids[i:i + 3] for i in range(4)]

    def run(i):
        try:
            out[i] = [engines[i].generate(prompts[i], max_tokens=48, temp=0) for _ in range(3)]
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts) and not errors, errors
    for i in range(4):
        assert out[i] == [mtp_sm.greedy(prompts[i], 48).text] * 3
    assert idle_cpu_seconds() < 0.06
    for e in engines:
        e.close()


def test_close_from_another_thread_while_others_wait_for_the_cpu(mtp_model, mtp_sm):
    """A session closed while its stream waits for the CPU lock (another session computes)
    ends cleanly; the lock is not left held."""
    a = mtp_cy.Session(mtp_model, n_ctx=256, n_threads=2)
    b = mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=256, n_threads=2)
    p = mtp_sm.token_ids[:3]
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            a.generate(p, max_tokens=32, temp=0)

    t = threading.Thread(target=busy)
    t.start()
    try:
        it = b.stream(p, max_tokens=200, temp=0)
        next(it)
        closer = threading.Timer(0.05, b.close)
        closer.start()
        try:
            for _ in it:
                pass
        except mtp_cy.ClosedError:
            pass
        closer.join(30)
        assert not closer.is_alive()
        with pytest.raises(mtp_cy.ClosedError):
            b.generate(p, max_tokens=2)
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive()
    assert a.generate(p, max_tokens=8, temp=0) == mtp_sm.greedy(p, 8).text
    a.close()
