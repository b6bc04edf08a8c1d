#!/usr/bin/env python3
"""What does a prompt cost an engine with an MTP head, against one without?

    python benchmarks/bench_prompt_head.py [--model moe-2.3b-a0.6b:q4_k_m] [--sizes 4,8,21,199] [--repeats 40]

Runs, in one process and in alternating order, prompts of random words (``--sizes`` tokens,
no prompt cache, one generated token, the call's ``n_draft=0``) on ``Batch(n_seq=4,
n_draft=0)`` (no head) and on ``Batch(n_seq=4, n_draft="auto")`` (a head engine: on Qwen3.5's
hybrid models its context keeps rollback snapshots of the recurrent state), 2 threads each,
and prints the medians of the prompt's processing time (``Completion.stats["timing_us"]
["prefill"]``) and their difference.  With ``n_draft=0`` the head is not fed the prompt, so
both engines run the same target decode; what differs is what the head engine's context
writes for a rollback (``vendor/patches/0010`` turns that off for prompt chunks).  Run on a
quiet machine.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_batch import model_of  # noqa: E402  (imports mtp_cy: installed, or this checkout)

import mtp_cy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="moe-2.3b-a0.6b:q4_k_m")
    ap.add_argument("--sizes", default="4,8,21,199")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    sm = model_of(args.model)
    rng = random.Random(1)
    ids = list(sm.token_ids)
    kw = dict(n_seq=4, n_ctx=4 * max(512, 2 * max(sizes)), n_threads=args.threads, cache_prompt=False)
    with mtp_cy.Model(sm.path) as model, \
            mtp_cy.Batch(model, n_draft=0, **kw) as plain, mtp_cy.Batch(model, n_draft="auto", **kw) as head:
        engines = [("no head", plain), ("head", head)]
        print(f"{args.model}: prompt processing, median of {args.repeats} alternating repeats (ms)")
        print(f"{'tokens':>7} {'no head':>9} {'head':>9} {'head - no head':>15} {'ratio':>7}")
        for n in sizes:
            for _, e in engines:            # warm-up: graphs of this shape, pages faulted in
                for _ in range(2):
                    e.complete([rng.choice(ids) for _ in range(n)], max_tokens=1, temp=0, n_draft=0)
            ms = {name: [] for name, _ in engines}
            for r in range(args.repeats):
                for name, e in (engines if r % 2 == 0 else engines[::-1]):
                    c = e.complete([rng.choice(ids) for _ in range(n)], max_tokens=1, temp=0, n_draft=0)
                    ms[name].append(c.stats["timing_us"]["prefill"] / 1e3)
            a, b = statistics.median(ms["no head"]), statistics.median(ms["head"])
            print(f"{n:>7} {a:>9.1f} {b:>9.1f} {b - a:>+15.1f} {b / a:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
