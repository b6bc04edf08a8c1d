#!/usr/bin/env python3
"""Time to first token of a conversation's next turn, with and without the prompt cache.

    python benchmarks/bench_prompt_cache.py [--size bench|tiny] [--history 2000] [--repeats 3]

Turn 1 is a prompt of ``--history`` tokens; turn 2 is that prompt, the reply and a
few new tokens (what a chat sends).  Measured, for Session and MTP, side by side and
interleaved: the time from the call to the first token of turn 2 when the session
still holds turn 1 (``cache_prompt=True``, the default) and when it does not
(``clear_cache()`` before turn 2: a cold call).  The synthetic models are hybrid
(Gated-DeltaNet + attention, like Qwen3.5/3.6), so reuse goes through a state
checkpoint.  Median of the repeats.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import mtp_cy
except ImportError:
    sys.path.insert(0, str(ROOT))
    import mtp_cy  # noqa: E402
from mtp_cy import synthetic  # noqa: E402


def ttft(engine, prompt, max_tokens):
    """Seconds to the first token, the generated ids, and the prompt tokens reused."""
    before = engine.stats()["prompt_tokens_cached"]
    t0 = time.perf_counter()
    it = engine.stream_events(prompt, max_tokens=max_tokens, temp=0)
    toks = []
    first = None
    for ev in it:
        if ev[0] == "token":
            if first is None:
                first = time.perf_counter() - t0
            toks.append(ev[1])
    return first, toks, engine.stats()["prompt_tokens_cached"] - before


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="bench", choices=["bench", "tiny"])
    ap.add_argument("--history", type=int, default=2000)
    ap.add_argument("--reply", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    sm = synthetic.cached_model(mtp=True, acceptance=0.75, size=args.size)
    words = sm.token_ids
    turn1 = [words[(7 * i) % len(words)] for i in range(args.history)]
    extra = [words[(3 * i + 1) % len(words)] for i in range(30)]
    n_ctx = args.history + args.reply + len(extra) + 64
    opts = {"n_ctx": n_ctx}
    if args.threads is not None:
        opts["n_threads"] = args.threads
    print(f"# mtp_cy {mtp_cy.__version__}; model {sm.n_params / 1e6:.0f}M params (hybrid qwen35); "
          f"turn 1: {len(turn1)} tokens, reply {args.reply}, turn 2 adds {len(extra)}; median of {args.repeats}")
    rows = []
    with mtp_cy.Model(sm.path) as model:
        for name, make in (("Session", lambda: mtp_cy.Session(model, **opts)),
                           ("MTP n_draft=3", lambda: mtp_cy.MTP(model, n_draft=3, **opts))):
            with make() as eng:
                cold, warm, reused = [], [], 0
                for _ in range(args.repeats):
                    eng.clear_cache()
                    _, reply, _ = ttft(eng, turn1, args.reply)
                    turn2 = turn1 + reply + extra
                    t_warm, toks_warm, reused = ttft(eng, turn2, 8)
                    eng.clear_cache()
                    t_cold, toks_cold, _ = ttft(eng, turn2, 8)
                    assert toks_warm == toks_cold, "reuse changed the output"
                    warm.append(t_warm)
                    cold.append(t_cold)
                w, c = statistics.median(warm), statistics.median(cold)
                rows.append((name, len(turn2), reused, c, w))
    print(f"\n{'engine':<16}{'turn-2 prompt':>14}{'reused':>8}{'cold TTFT s':>13}{'reuse TTFT s':>14}{'reuse/cold':>12}")
    for name, n, reused, c, w in rows:
        print(f"{name:<16}{n:>14}{reused:>8}{c:>13.3f}{w:>14.3f}{w / c:>11.1%}")


if __name__ == "__main__":
    main()
