#!/usr/bin/env python3
"""One call alone on a ``Batch``: does it run as fast as a lone ``MTP`` session?

    python benchmarks/bench_lone_call.py [--model dense-1.3b] [--tokens 128] [--repeats 3]

Runs, in one process and in alternating order, the same greedy call (``--tokens`` tokens) on
``MTP(n_draft="auto")``, ``Batch(n_seq=4, n_draft="auto")`` and ``Batch(n_seq=4, n_draft=0)``
(2 threads each, no prompt cache) and prints the medians of tokens per second over the call's
wall time and of the per-repeat ratios to ``Batch`` plain.  A lone sequence of a Batch is
decided by MTP's one-sequence policy, so ``batch auto`` should match ``mtp auto``.  Run on a
quiet machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_mtp import model_of  # noqa: E402  (imports mtp_cy: installed, or this checkout)

import mtp_cy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dense-1.3b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sm = model_of(args.model, 0.75, 0.58)
    model = mtp_cy.Model(sm.path)
    kw = dict(n_threads=args.threads, cache_prompt=False)
    engines = {"mtp auto": mtp_cy.MTP(model, n_draft="auto", **kw),
               "batch auto": mtp_cy.Batch(model, n_seq=4, **kw),
               "batch plain": mtp_cy.Batch(model, n_seq=4, n_draft=0, **kw)}
    prompt = "the sea moon star"
    for e in engines.values():
        e.generate(prompt, max_tokens=64, temp=0)        # warm up (and let auto measure)
    speed = {k: [] for k in engines}
    for r in range(args.repeats):
        for k in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            t0 = time.perf_counter()
            c = engines[k].complete(prompt, max_tokens=args.tokens, temp=0)
            speed[k].append(c.usage.completion_tokens / (time.perf_counter() - t0))
    print(f"# {args.model}, {args.tokens} greedy tokens, {args.threads} threads, median of {args.repeats}; "
          f"mtp_cy {mtp_cy.__version__} from {Path(mtp_cy.__file__).parent}")
    for k in engines:
        ratio = statistics.median(a / b for a, b in zip(speed[k], speed["batch plain"]))
        print(f"{k:12s} {statistics.median(speed[k]):7.2f} tok/s  {ratio:.3f}x batch plain")
    single = engines["batch auto"].stats()["policy"].get("single")
    if single:
        print("batch auto, one-sequence policy chose:", single["chosen"])
    for e in engines.values():
        e.close()
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
