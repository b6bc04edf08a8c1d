#!/usr/bin/env python3
"""The cost of a large grammar, mtp_cy against llama.cpp's own sampler, and how fast a deadline
or cancel() stops it.

    python benchmarks/bench_grammar.py [--enum 300,1500] [--tokens 6] [--threads 2]

A JSON schema ``{"enum": [N strings]}`` on a synthetic model with Qwen3.5's 151,936-token
vocabulary (the grammar judges every candidate token against every enum entry still alive, so
a step costs seconds on a CPU).  For each N: the sampling time per token of mtp_cy's
``Session`` (``stats()["timing_us"]["sample"]``, greedy) and of upstream's ``llama-completion``
with the same schema (``--json-schema``; its "sampling time" line), built from the vendored
source; then a call with ``timeout=`` a tenth of one such step and one cancelled from another
thread after the same time: how late each took effect.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
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


def schema(n):
    return {"enum": [f"w{i}x{i * 7 % 13}" for i in range(n)]}


def upstream(binary, path, prompt, sch, n, threads):
    cmd = [str(binary), "-m", str(path), "-p", prompt, "-n", str(n), "--temp", "0", "-no-cnv", "-c", "256",
           "-t", str(threads), "--json-schema", json.dumps(sch)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{binary.name} failed:\n{p.stderr[-2000:]}")
    # "sampling time = X ms" is the total of the run; the tokens sampled: one after the
    # prompt, one after every eval run
    m = re.search(r"\bsampling time =\s*([\d.]+) ms", p.stderr)
    e = re.search(r"\beval time =\s*[\d.]+ ms /\s*(\d+) runs", p.stderr)
    return float(m.group(1)) / (int(e.group(1)) + 1) if m and e else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--enum", default="300,1500", help="enum sizes, comma-separated")
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-upstream", action="store_true")
    a = ap.parse_args()
    sm = synthetic.cached_model(mtp=True, acceptance=0.75, vocab="qwen35")
    binary = None
    if not a.skip_upstream:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import upstream_binary
        binary = upstream_binary("llama-completion")
    prompt_ids = sm.token_ids[:3]
    prompt = sm.decode(prompt_ids)
    print(f"# mtp_cy {mtp_cy.__version__}, llama.cpp {mtp_cy.llama_cpp_commit}; {os.cpu_count()} CPUs, "
          f"{a.threads} threads; vocabulary 151,936 tokens; greedy, {a.tokens} tokens; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("| enum entries | mtp_cy sampling ms/token | llama.cpp sampling ms/token | mtp_cy/llama.cpp | "
          "timeout late by | cancel() late by |")
    print("|---:|---:|---:|---:|---:|---:|")
    with mtp_cy.Model(sm.path) as model, mtp_cy.Session(model, n_ctx=256, n_threads=a.threads) as s:
        for n in (int(x) for x in a.enum.split(",")):
            sch = schema(n)
            s.reset_stats()
            s.clear_cache()
            c = s.complete(prompt_ids, json_schema=sch, max_tokens=a.tokens, temp=0, timeout=None)
            st = s.stats()
            ours = st["timing_us"]["sample"] / 1e3 / max(1, st["iters"])
            step = st["timing_us"]["total"] / 1e6 / max(1, st["iters"])
            theirs = upstream(binary, sm.path, prompt, sch, a.tokens, a.threads) if binary else None
            limit = max(step / 10, 0.01)
            t0 = time.perf_counter()
            try:
                s.generate(prompt_ids, json_schema=sch, max_tokens=a.tokens, temp=0, timeout=limit)
                late_t = None
            except mtp_cy.GenerationTimeout:
                late_t = time.perf_counter() - t0 - limit
            timer = threading.Timer(limit, s.cancel)
            t0 = time.perf_counter()
            timer.start()
            s.generate(prompt_ids, json_schema=sch, max_tokens=a.tokens, temp=0, timeout=None)
            late_c = time.perf_counter() - t0 - limit
            timer.join()
            ratio = f"{ours / theirs:.2f}x" if theirs else "-"
            print(f"| {n} | {ours:.1f} | {'%.1f' % theirs if theirs else '-'} | {ratio} | "
                  f"{'%.3f s' % late_t if late_t is not None else 'did not fire'} | {late_c:.3f} s |  "
                  f"({len(c.tokens)} tokens: {c.text[:24]!r})", flush=True)


if __name__ == "__main__":
    main()
