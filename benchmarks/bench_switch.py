#!/usr/bin/env python3
"""Speed that does not depend on what ran before: one session alone, after another session, after
an MTP session, after another session and an idle second, and two sessions at once.

    python benchmarks/bench_switch.py [--sizes tiny,bench] [--tokens 256] [--repeats 5] [--json out.json]

For each model (``tiny``: the demo's ~10M model, ``bench``: the 239M preset) and each measured
engine X (a ``Session`` and an ``MTP`` with ``n_draft=3``, default options: every CPU), every round
runs, in this order and with the same greedy prompt:

* ``alone``: X after X (the reference);
* ``after Session``: another ``Session`` B generates, then X;
* ``after MTP``: an ``MTP`` session M generates, then X;
* ``alone + 1 s``: X, the process idles for a second, then X (on a VM an idle second can change
  the speed of what follows by itself);
* ``after Session + 1 s``: B generates, the process idles for a second, then X;
* ``two at once``: X and a twin of X (another session of the same kind and options) generate
  in two threads at the same time; their tokens together over the wall time.

Each round runs every case once, in an order shuffled per round (seeded), and pairs each
measurement with a reference run of X alone right before or right after it (alternating): on a
VM the speed drifts between calls by more than any effect measured here (the tiny model runs
anywhere between ~1,200 and ~2,600 tok/s in one process), and such drift lasts across adjacent
calls, so the ratio within a pair cancels it.  Reported: the median tok/s of each case and the
median of its paired ratios (``x``).
``idle CPU`` is the CPU time the whole process burnt in the 0.5 s after a call ended (helper
threads still polling for work show up here).  Run it on a quiet machine: a 2-core box shared with
a build gives noise, not numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import mtp_cy
except ImportError:
    sys.path.insert(0, str(ROOT))
    import mtp_cy  # noqa: E402
from mtp_cy import synthetic  # noqa: E402

CASES = ("alone", "after Session", "after MTP", "alone + 1 s", "after Session + 1 s", "two at once")


def process_cpu_s():
    """User + system CPU seconds of every thread of this process so far."""
    t = os.times()
    return t.user + t.system


def timed_call(eng, prompt, n):
    t0 = time.perf_counter()
    eng.generate(prompt, max_tokens=n, temp=0)
    return n / (time.perf_counter() - t0)


def two_at_once(a, b, prompt, n):
    barrier = threading.Barrier(3)

    def run(e):
        barrier.wait()
        e.generate(prompt, max_tokens=n, temp=0)

    ts = [threading.Thread(target=run, args=(e,)) for e in (a, b)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return 2 * n / (time.perf_counter() - t0)


def idle_cpu_after_call(eng, prompt, n, window=0.5):
    eng.generate(prompt, max_tokens=n, temp=0)
    c0 = process_cpu_s()
    time.sleep(window)
    return (process_cpu_s() - c0) * 1000.0


def bench_model(size, tokens, repeats):
    sm = synthetic.cached_model(mtp=True, acceptance=0.75, size=size)
    prompt = sm.token_ids[:4]
    out = {"model": size, "params_m": round(sm.n_params / 1e6, 1), "tokens": tokens, "engines": {}}
    with mtp_cy.Model(sm.path) as model:
        make = {"Session": lambda: mtp_cy.Session(model),
                "MTP n_draft=3": lambda: mtp_cy.MTP(model, n_draft=3)}
        other_session, other_mtp = mtp_cy.Session(model), mtp_cy.MTP(model, n_draft=3)
        for name, new in make.items():
            x, twin = new(), new()
            for e in (x, twin, other_session, other_mtp):
                e.generate(prompt, max_tokens=16, temp=0)           # warm: graphs, caches
            runs = {c: [] for c in CASES}
            ratios = {c: [] for c in CASES}
            before = {"alone": (x, 0.0), "after Session": (other_session, 0.0), "after MTP": (other_mtp, 0.0),
                      "alone + 1 s": (x, 1.0), "after Session + 1 s": (other_session, 1.0)}
            rng = random.Random(len(runs) * 1000 + tokens)
            def measure(case):
                if case == "two at once":
                    return two_at_once(x, twin, prompt, tokens)
                prev, idle = before[case]
                prev.generate(prompt, max_tokens=tokens, temp=0)
                if idle:
                    time.sleep(idle)
                return timed_call(x, prompt, tokens)

            k = 0
            for _ in range(repeats):
                order = list(CASES)
                rng.shuffle(order)
                for case in order:
                    k += 1
                    if k % 2:
                        v, ref = measure(case), measure("alone")
                    else:
                        ref, v = measure("alone"), measure(case)
                    runs[case].append(v)
                    ratios[case].append(v / ref)
            idle = statistics.median(idle_cpu_after_call(x, prompt, tokens) for _ in range(3))
            med = {c: statistics.median(v) for c, v in runs.items()}
            out["engines"][name] = {
                "tok_s": {c: round(v, 1) for c, v in med.items()},
                "ratio": {c: round(statistics.median(v), 3) for c, v in ratios.items()},
                "runs": {c: [round(x, 1) for x in v] for c, v in runs.items()},
                "idle_cpu_ms_per_0.5s": round(idle, 1),
            }
            x.close()
            twin.close()
        other_session.close()
        other_mtp.close()
    out["threads_at_end"] = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,bench", help="comma-separated: tiny, bench (239M)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per call (default 256 tiny, 128 bench)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    print(f"# mtp_cy {mtp_cy.__version__}, llama.cpp {mtp_cy.llama_cpp_commit}; {os.cpu_count()} CPUs; "
          f"greedy, default options (n_threads = every CPU); median of {a.repeats} interleaved rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    results = []
    for size in a.sizes.split(","):
        tokens = a.tokens or (256 if size == "tiny" else 128)
        r = bench_model(size, tokens, a.repeats)
        results.append(r)
        print(f"\n## {size} ({r['params_m']}M params), {tokens} tokens per call")
        print(f"| engine | {' | '.join(CASES)} | idle CPU after a call |")
        print("|---|" + "---:|" * (len(CASES) + 1))
        for name, e in r["engines"].items():
            cells = [f"{e['tok_s'][c]:.1f} ({e['ratio'][c]:.2f}x)" for c in CASES]
            print(f"| {name} | {' | '.join(cells)} | {e['idle_cpu_ms_per_0.5s']:.0f} ms / 0.5 s |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
