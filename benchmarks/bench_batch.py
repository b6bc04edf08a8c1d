#!/usr/bin/env python3
"""Many concurrent calls: ``mtp_cy.Batch`` against separate ``MTP`` sessions in threads.

    python benchmarks/bench_batch.py [--models tiny,bench] [--conc 1,2,4,8] [--tokens 64]
                                     [--repeats 2] [--threads N] [--json out.json]

For each model and each concurrency C (C calls started at once from C threads, greedy, each with
its own prompt and ``--tokens`` tokens), the aggregate tokens per second over the wall time of:

* ``batch plain``: ``Batch(n_seq=max C, n_draft=0)``;
* ``batch k=3``: ``Batch(n_draft=3)``;
* ``batch auto``: ``Batch(n_draft="auto")``;
* ``sessions auto``: C separate ``MTP(n_draft="auto")`` sessions, one per thread (today's way).

Every configuration runs once per repeat, in an order that alternates between repeats, and the
ratios (``x plain``: against ``batch plain`` at the same C, in the same repeat) are the medians of
the per-repeat ratios: on these VMs the speed drifts by +-20% between processes and calls, and a
ratio taken within one run cancels most of it.  The peer upstream program (llama-server with
``-np``) is not part of this run: the vendored source (the llama-cpp-python sdist as fetched by
vendor/fetch_llama_cpp.py) does not carry tools/server yet.  Run on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
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

CONFIGS = ("batch plain", "batch k=3", "batch auto", "sessions auto")


def model_of(name):
    if name in ("tiny", "bench"):
        return synthetic.cached_model(size=name, mtp=True, acceptance=0.75)
    return synthetic.cached_model(preset=name, mtp=True, acceptance=0.75)


def prompts_of(sm, n):
    ids = sm.token_ids
    return [[ids[(7 * i + j) % len(ids)] for j in range(8)] for i in range(n)]


def run_concurrent(call, n):
    """Start n calls at once (a barrier), return (tokens, wall seconds)."""
    out = [0] * n
    bar = threading.Barrier(n + 1)

    def work(i):
        bar.wait()
        out[i] = call(i)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    bar.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return sum(out), time.perf_counter() - t0


def bench_model(name, args):
    sm = model_of(name)
    conc = [int(x) for x in args.conc.split(",")]
    n_seq = max(conc)
    n_ctx = 512
    res = {c: {k: [] for k in CONFIGS} for c in conc}
    kw = dict(n_ctx=n_ctx * n_seq, n_threads=args.threads) if args.threads else dict(n_ctx=n_ctx * n_seq)
    skw = dict(n_ctx=n_ctx, n_threads=args.threads) if args.threads else dict(n_ctx=n_ctx)
    with mtp_cy.Model(sm.path) as m:
        engines = {"batch plain": mtp_cy.Batch(m, n_seq=n_seq, n_draft=0, **kw),
                   "batch k=3": mtp_cy.Batch(m, n_seq=n_seq, n_draft=3, **kw),
                   "batch auto": mtp_cy.Batch(m, n_seq=n_seq, **kw)}
        sessions = [mtp_cy.MTP(m, n_draft="auto", cache_prompt=False, **skw) for _ in range(n_seq)]
        try:
            for e in engines.values():     # warm up (and let auto measure)
                run_concurrent(lambda i, e=e: len(e.complete(prompts_of(sm, n_seq)[i], max_tokens=args.tokens,
                                                             temp=0).tokens), n_seq)
            for r in range(args.repeats):
                for c in conc:
                    ps = prompts_of(sm, c)
                    order = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
                    for cfg in order:
                        if cfg == "sessions auto":
                            def call(i):
                                return len(sessions[i].complete(ps[i], max_tokens=args.tokens, temp=0).tokens)
                        else:
                            e = engines[cfg]
                            e.clear_cache()

                            def call(i, e=e):
                                return len(e.complete(ps[i], max_tokens=args.tokens, temp=0).tokens)
                        tok, wall = run_concurrent(call, c)
                        res[c][cfg].append(tok / wall)
        finally:
            for e in engines.values():
                e.close()
            for s in sessions:
                s.close()
    out = {}
    print(f"\n{name}: {args.tokens} tokens per call, n_seq {n_seq}, threads {args.threads or 'all'}")
    print(f"{'calls':>5} " + " ".join(f"{c:>22}" for c in CONFIGS))
    for c in conc:
        row = {}
        cells = []
        for cfg in CONFIGS:
            tps = statistics.median(res[c][cfg])
            ratio = statistics.median(a / b for a, b in zip(res[c][cfg], res[c]["batch plain"]))
            row[cfg] = {"tok_s": round(tps, 1), "x_plain": round(ratio, 3)}
            cells.append(f"{tps:9.1f} tok/s {ratio:5.2f}x")
        out[c] = row
        print(f"{c:>5} " + " ".join(f"{x:>22}" for x in cells))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny")
    ap.add_argument("--conc", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="threads per engine (0: every CPU)")
    ap.add_argument("--json")
    args = ap.parse_args()
    allres = {name: bench_model(name, args) for name in args.models.split(",")}
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                               "args": vars(args), "results": allres}, indent=1))


if __name__ == "__main__":
    main()
