#!/usr/bin/env python3
"""mtp_cy against llama.cpp's native loops, side by side, in one run.

    python benchmarks/bench_mtp.py                 # >=200M-param synthetic model, n_draft 1-4
    python benchmarks/bench_mtp.py --size tiny     # per-iteration overhead dominates

Part 1 (throughput), on a synthetic qwen35 + MTP model (``--size bench``:
>= 200M parameters, f16, memory-bound decoding), interleaved per repeat:

* mtp_cy ``Session`` (plain greedy) and ``MTP`` for each ``--n-draft``;
* upstream ``llama-speculative-simple --spec-type draft-mtp`` with the same
  model, prompt, ``-n``, context, threads and draft length (its
  ``decoded N tokens in T seconds`` line: decode phase only, like ours);
* upstream ``llama-completion`` (plain decoding, its ``eval time`` line).

Reported: tokens/s (median of the repeats), mtp_cy / native ratio per
configuration, speed-up over plain decoding, acceptance.

Part 2 (Python-side cost per token), on the tiny model: plain ``Session``
against ``llama-completion``'s eval rate (its ``eval time`` plus its
``sampling time`` per token, since mtp_cy's loop samples too):
``1e6/ours - 1e6/native`` microseconds per token (and mtp_cy's own
measurement: wall-clock decode time minus native loop time, per token).

The upstream programs are built from the vendored llama.cpp in the native
build tree (``build/native``) on first use.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import mtp_cy  # the installed package (pip install [-e] .), e.g. a wheel under test
except ImportError:  # a checkout built in place (python setup.py build_ext --inplace)
    sys.path.insert(0, str(ROOT))
    import mtp_cy  # noqa: E402
from mtp_cy import synthetic  # noqa: E402
from mtp_cy.bench import format_table, measure  # noqa: E402

PROMPT_WORDS = "the sea moon star"


def upstream_bin(name: str) -> Path:
    sys.path.insert(0, str(ROOT / "vendor"))
    import native_build
    path = native_build.upstream_program(name, ROOT)
    if path is None:
        sys.exit(f"upstream's {name} not found: set MTP_CY_UPSTREAM_BIN to a directory holding it, or "
                 f"run `pip install -e .` (or python setup.py build_ext --inplace) first to make the "
                 f"native build tree it is built in")
    return path


def run_spec(binary, sm, text, n_draft, n, n_ctx, threads):
    cmd = [str(binary), "-m", str(sm.path), "--spec-type", "draft-mtp", "--spec-draft-n-max", str(n_draft),
           "-n", str(n), "-p", text, "--temp", "0", "-c", str(n_ctx), "-t", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{binary.name} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", p.stderr)
    acc = re.search(r"n_drafted\s*=\s*(\d+).*?n_accept\s*=\s*(\d+)", p.stderr, re.S)
    n_dec, secs = int(m.group(1)), float(m.group(2))
    acceptance = int(acc.group(2)) / int(acc.group(1)) if acc and int(acc.group(1)) else 0.0
    return n_dec / secs, acceptance


def run_completion(binary, sm, text, n, n_ctx, threads):
    cmd = [str(binary), "-m", str(sm.path), "-p", text, "-n", str(n), "--temp", "0", "-no-cnv",
           "-c", str(n_ctx), "-t", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{binary.name} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", p.stderr)
    ms, runs = float(m.group(1)), int(m.group(2))
    sm_ = re.search(r"\bsampling time =\s*([\d.]+) ms", p.stderr)   # common_perf_print: total over the run
    per_tok_s = (ms + (float(sm_.group(1)) if sm_ else 0.0)) / runs / 1e3
    return 1.0 / per_tok_s          # tokens/s of decode + sampling, as in our loop


def part_throughput(args):
    sm = synthetic.cached_model(mtp=True, acceptance=args.acceptance, size=args.size)
    drafts = [int(x) for x in args.n_draft.split(",")]
    prompt = sm.encode(PROMPT_WORDS)
    text = sm.decode(prompt)
    n_ctx = len(prompt) + args.max_tokens + 64
    spec = None if args.skip_upstream else upstream_bin("llama-speculative-simple")
    comp = None if args.skip_upstream else upstream_bin("llama-completion")
    print(f"# model: synthetic qwen35+MTP, size={args.size}, {sm.n_params / 1e6:.0f}M params, "
          f"acceptance knob {args.acceptance}; prompt {text!r}; {args.max_tokens} tokens; "
          f"threads {args.threads}; {args.repeats} interleaved repeats", flush=True)
    ours = {}
    native = {}
    with mtp_cy.Model(sm.path) as model:
        for r in range(args.repeats):
            rows = measure(model, prompt, max_tokens=args.max_tokens, n_drafts=drafts, repeats=1,
                           n_ctx=n_ctx, n_threads=args.threads)
            for row in rows:
                ours.setdefault(row.name, []).append(row)
            if spec is not None:
                native.setdefault("plain", []).append((run_completion(comp, sm, text, args.max_tokens,
                                                                      n_ctx, args.threads), None))
                for k in drafts:
                    native.setdefault(f"mtp-{k}", []).append(run_spec(spec, sm, text, k, args.max_tokens,
                                                                     n_ctx, args.threads))
            print(f"# repeat {r + 1}/{args.repeats} done", flush=True)
    med_rows = []
    for name, rs in ours.items():
        rs = sorted(rs, key=lambda x: x.decode_tok_s)
        med_rows.append(rs[len(rs) // 2])
    print()
    print(format_table(med_rows))
    if native:
        print()
        base_ours = next(r.decode_tok_s for r in med_rows if r.name == "plain")
        base_nat = statistics.median(v for v, _ in native["plain"])
        head = f"{'config':<10}{'mtp_cy tok/s':>14}{'native tok/s':>14}{'mtp_cy/native':>15}" \
               f"{'speed-up mtp_cy':>17}{'speed-up native':>17}{'accept':>9}"
        print(head)
        print("-" * len(head))
        for row in med_rows:
            nat = statistics.median(v for v, _ in native[row.name])
            acc = f"{row.acceptance * 100:.1f}%" if row.n_draft else "-"
            nat_name = "llama-completion" if row.name == "plain" else "speculative-simple"
            print(f"{row.name:<10}{row.decode_tok_s:>14.1f}{nat:>14.1f}{row.decode_tok_s / nat:>14.2f}x"
                  f"{row.decode_tok_s / base_ours:>16.2f}x{nat / base_nat:>16.2f}x{acc:>9}   ({nat_name})")
    return med_rows


def part_python_cost(args):
    sm = synthetic.cached_model(mtp=True, acceptance=args.acceptance, size="tiny")
    prompt = sm.encode(PROMPT_WORDS)
    text = sm.decode(prompt)
    n = 256
    n_ctx = len(prompt) + n + 64
    comp = upstream_bin("llama-completion")
    ours, nat = [], []
    with mtp_cy.Model(sm.path) as model:
        for _ in range(args.repeats):
            rows = measure(model, prompt, max_tokens=n, n_drafts=[], repeats=1, n_ctx=n_ctx,
                           n_threads=args.threads)
            ours.append(rows[0])
            nat.append(run_completion(comp, sm, text, n, n_ctx, args.threads))
    o = sorted(ours, key=lambda x: x.decode_tok_s)[len(ours) // 2]
    u = statistics.median(nat)
    print(f"\n# Python-side cost per token (tiny model, {sm.n_params / 1e6:.0f}M params, plain decoding, "
          f"{n} tokens)")
    print(f"mtp_cy Session: {o.decode_tok_s:.0f} tok/s (native loop alone {o.native_tok_s:.0f} tok/s); "
          f"llama-completion eval: {u:.0f} tok/s")
    print(f"cost vs llama-completion: {1e6 / o.decode_tok_s - 1e6 / u:+.1f} us/token; "
          f"generator + bookkeeping measured inside mtp_cy: {o.py_us_per_token:.1f} us/token")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="bench", choices=["bench", "tiny"])
    ap.add_argument("--acceptance", type=float, default=0.75)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--n-draft", default="1,2,3,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-upstream", action="store_true", help="only mtp_cy (no native comparison)")
    ap.add_argument("--skip-python-cost", action="store_true")
    args = ap.parse_args()
    print(f"# mtp_cy {mtp_cy.__version__}, llama.cpp {mtp_cy.llama_cpp_commit}; {mtp_cy.system_info()}")
    part_throughput(args)
    if not args.skip_upstream and not args.skip_python_cost:
        part_python_cost(args)


if __name__ == "__main__":
    main()
