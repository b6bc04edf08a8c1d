#!/usr/bin/env python3
"""Generation speed from any thread: main thread, a threading.Thread, asyncio, side by side.

    python benchmarks/bench_threads.py [--size tiny|bench] [--tokens 300] [--repeats 5]

Each repeat runs the same greedy generation (Session and MTP) on the main thread, on
a fresh ``threading.Thread``, with ``await agenerate(...)`` and with ``async for`` over
``astream(...)`` (one event-loop hop per token), then on the main thread again; the
median time of each is reported with its ratio to the first main-thread run, and the
number of threads the process holds at the end (a session owns a pool of
``n_threads - 1`` helper threads; the asyncio executor's workers come on top).
Run it on a quiet machine: a 2-core box shared with a build gives noise.
"""
from __future__ import annotations

import argparse
import asyncio
import os
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


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="n_threads of the sessions (default: all CPUs)")
    args = ap.parse_args()
    sm = synthetic.cached_model(mtp=True, acceptance=0.75, size=args.size)
    print(f"# mtp_cy {mtp_cy.__version__}, llama.cpp {mtp_cy.llama_cpp_commit}; {os.cpu_count()} CPUs; "
          f"model {sm.n_params / 1e6:.0f}M params; {args.tokens} tokens, greedy; median of {args.repeats}")
    opts = {} if args.threads is None else {"n_threads": args.threads}
    with mtp_cy.Model(sm.path) as model:
        for name, eng in (("Session", mtp_cy.Session(model, **opts)),
                          ("MTP n_draft=3", mtp_cy.MTP(model, n_draft=3, **opts))):
            p = sm.token_ids[:4]

            def gen():
                eng.generate(p, max_tokens=args.tokens, temp=0)

            def on_thread():
                t = threading.Thread(target=gen)
                t.start()
                t.join()

            async def agen():
                await eng.agenerate(p, max_tokens=args.tokens, temp=0)

            async def astream():
                async for _ in eng.astream(p, max_tokens=args.tokens, temp=0):
                    pass

            gen()                                         # warm-up
            res = {k: [] for k in ("main", "thread", "agenerate", "astream", "main again")}
            for _ in range(args.repeats):
                res["main"].append(timed(gen))
                res["thread"].append(timed(on_thread))
                res["agenerate"].append(timed(lambda: asyncio.run(agen())))
                res["astream"].append(timed(lambda: asyncio.run(astream())))
                res["main again"].append(timed(gen))
            base = statistics.median(res["main"])
            print(f"\n{name}")
            print(f"{'caller':<14}{'seconds':>10}{'tok/s':>10}{'vs main':>10}")
            for k, v in res.items():
                m = statistics.median(v)
                print(f"{k:<14}{m:>10.3f}{args.tokens / m:>10.0f}{base / m:>9.2f}x")
            eng.close()
    print(f"\nthreads in the process: {len(os.listdir('/proc/self/task')) if os.path.isdir('/proc/self/task') else '?'}"
          f" (Python threads: {threading.active_count()})")


if __name__ == "__main__":
    main()
