#!/usr/bin/env python3
"""mtp_cy against llama.cpp's native loops, side by side, in one run: plain decoding,
fixed draft lengths, p_min and n_draft="auto", on models shaped like real MTP models.

    python benchmarks/bench_mtp.py                               # all default models
    python benchmarks/bench_mtp.py --models tiny,bench --repeats 3
    python benchmarks/bench_mtp.py --models dense-1.3b --configs plain,3,auto --json out.json

Models (``mtp_cy.synthetic``, generated once and cached; the acceptance knob is 0.75
and, so that ``p_min`` has something to cut, the MTP head is unsure where it is wrong:
``draft_confidence`` 0.58):

* ``tiny``: 10M parameters -- per-token overheads dominate, drafting cannot pay;
* ``bench``: 239M parameters, f16;
* ``dense-1.3b`` / ``dense-1.3b-q8_0`` / ``dense-1.3b-q4_k_m``: the shape of a real
  MTP model (n_embd 2048, 16 trunk layers of which 12 Gated-DeltaNet, n_ff 8192,
  the MTP head sharing the output head; ~1.35B parameters), f16 and quantized by
  upstream's llama-quantize;
* ``moe-2.3b-a0.6b`` (and ``-q4_k_m``): the MoE shape (64 experts, 8 used, plus a
  shared expert).

Configurations (``--configs``): ``plain``, a draft length ``k``, ``k@p`` (draft length k
with ``p_min=p``) and ``auto``.  For each model, every repeat runs every configuration
once, interleaved (in the listed order on even repeats, reversed on odd ones, so that the
order of the runs cannot tilt the ratios), mtp_cy then the native program with the same settings
(``llama-completion`` for plain decoding, ``llama-speculative-simple --spec-type
draft-mtp`` otherwise, built as upstream builds them by default, i.e. with OpenMP, unless
``--native same``; ``auto`` has no native counterpart); medians are reported with
the ratios mtp_cy/native and configuration/plain, the acceptance, what ``auto`` chose,
and the draft cost relative to a target step (measured by ``auto``, and the
theoretical parameter ratio of the model).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import mtp_cy  # the installed package (pip install [-e] .), e.g. a wheel under test
except ImportError:  # a checkout built in place (python setup.py build_ext --inplace)
    sys.path.insert(0, str(ROOT))
    import mtp_cy  # noqa: E402
from mtp_cy import synthetic  # noqa: E402
from mtp_cy.bench import _one_run  # noqa: E402

PROMPT_WORDS = "the sea moon star"
DEFAULT_MODELS = "tiny,bench,dense-1.3b,dense-1.3b-q4_k_m"
DEFAULT_CONFIGS = "plain,1,2,3,4,4@0.5,4@0.8,auto"


def model_of(name: str, acceptance: float, confidence):
    """The synthetic model for a benchmark model name (generated on first use)."""
    kw = dict(mtp=True, acceptance=acceptance, draft_confidence=confidence)
    base, _, q = name.partition("-q")
    if name in ("tiny", "bench"):
        return synthetic.cached_model(size=name, **kw)
    dtype = f"q{q}" if q else "f16"
    preset = base if q else name
    return synthetic.cached_model(preset=preset, dtype=dtype, **kw)


def upstream_bin(name: str, build: str = "openmp") -> Path:
    """Upstream's program: ``openmp``, built as upstream builds it by default (OpenMP threads;
    ``build/upstream-default``, built on first use), or ``same``, from mtp_cy's own build tree
    (ggml thread pools, no OpenMP, like mtp_cy).  ``$MTP_CY_UPSTREAM_BIN`` overrides both."""
    sys.path.insert(0, str(ROOT / "vendor"))
    import native_build
    if build == "openmp" and not os.environ.get("MTP_CY_UPSTREAM_BIN"):
        path = native_build.upstream_default_program(name, ROOT)
    else:
        path = native_build.upstream_program(name, ROOT)
    if path is None:
        sys.exit(f"upstream's {name} not found: set MTP_CY_UPSTREAM_BIN to a directory holding it, or build "
                 f"mtp_cy from a checkout first (pip install -e . or python setup.py build_ext --inplace)")
    return path


def run_spec(binary, path, text, n_draft, p_min, n, n_ctx, threads):
    cmd = [str(binary), "-m", str(path), "--spec-type", "draft-mtp", "--spec-draft-n-max", str(n_draft),
           "-n", str(n), "-p", text, "--temp", "0", "-c", str(n_ctx), "-t", str(threads)]
    if p_min:
        cmd += ["--spec-draft-p-min", str(p_min)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{binary.name} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", p.stderr)
    acc = re.search(r"n_drafted\s*=\s*(\d+).*?n_accept\s*=\s*(\d+)", p.stderr, re.S)
    acceptance = int(acc.group(2)) / int(acc.group(1)) if acc and int(acc.group(1)) else 0.0
    return int(m.group(1)) / float(m.group(2)), acceptance


def run_completion(binary, path, text, n, n_ctx, threads):
    cmd = [str(binary), "-m", str(path), "-p", text, "-n", str(n), "--temp", "0", "-no-cnv",
           "-c", str(n_ctx), "-t", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{binary.name} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", p.stderr)
    ms, runs = float(m.group(1)), int(m.group(2))
    s = re.search(r"\bsampling time =\s*([\d.]+) ms", p.stderr)   # total over the run
    return runs / ((ms + (float(s.group(1)) if s else 0.0)) / 1e3), None


def parse_configs(spec: str):
    """``plain,1,2,4@0.8,auto`` -> [(name, MTP options or None)]"""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item == "plain":
            out.append(("plain", None))
        elif item == "auto":
            out.append(("mtp-auto", {"n_draft": "auto"}))
        elif "@" in item:
            k, p = item.split("@")
            out.append((f"mtp-{int(k)}-p{float(p):g}", {"n_draft": int(k), "p_min": float(p)}))
        else:
            out.append((f"mtp-{int(item)}", {"n_draft": int(item)}))
    return out


def bench_model(name, args, configs, spec_bin, comp_bin):
    t0 = time.perf_counter()
    sm = model_of(name, args.acceptance, args.draft_confidence)
    gen_s = time.perf_counter() - t0
    prompt = sm.encode(PROMPT_WORDS)
    text = sm.decode(prompt)
    n_ctx = len(prompt) + args.max_tokens + 64
    cost = sm.draft_cost() if hasattr(sm, "draft_cost") else None
    print(f"\n## {name}: {sm.n_params / 1e6:.0f}M parameters, {sm.dtype}, {Path(sm.path).stat().st_size / 2**20:.0f} MiB"
          f" (ready in {gen_s:.0f} s); theoretical draft/target cost "
          f"{'%.3f' % cost.ratio if cost else '?'}", flush=True)
    ours, native = {}, {}
    sampling = {"temp": 0.0}
    with mtp_cy.Model(sm.path) as model:
        opts = {"n_ctx": n_ctx, "n_threads": args.threads}
        engines = {c: (mtp_cy.Session(model, **opts) if o is None else mtp_cy.MTP(model, **o, **opts))
                   for c, o in configs}
        try:
            # warm-up: weights paged in, graphs built; n_draft="auto" gets one generation to
            # measure this machine (it keeps learning during the measured runs too)
            for c, o in configs:
                _one_run(engines[c], prompt, args.max_tokens if o and o.get("n_draft") == "auto" else 8, sampling)
            for r in range(args.repeats):
                # the order alternates from one repeat to the next, so that no configuration
                # always runs first, or always right after the same other one
                for cname, o in (configs if r % 2 == 0 else configs[::-1]):
                    ours.setdefault(cname, []).append(_one_run(engines[cname], prompt, args.max_tokens, sampling))
                    if spec_bin is None or (o and o.get("n_draft") == "auto"):
                        continue
                    if o is None:
                        native.setdefault(cname, []).append(run_completion(comp_bin, sm.path, text, args.max_tokens,
                                                                           n_ctx, args.threads))
                    else:
                        native.setdefault(cname, []).append(run_spec(spec_bin, sm.path, text, o["n_draft"],
                                                                     o.get("p_min"), args.max_tokens, n_ctx,
                                                                     args.threads))
                print(f"# {name}: repeat {r + 1}/{args.repeats} done", flush=True)
            policies = {c: e.stats().get("policy") for c, e in engines.items()}
        finally:
            for e in engines.values():
                e.close()
    res = {"model": name, "params": sm.n_params, "dtype": sm.dtype,
           "theoretical_draft_ratio": cost.ratio if cost else None, "configs": {}}
    base = statistics.median(x["decode_tok_s"] for x in ours["plain"]) if "plain" in ours else None
    nat_base = statistics.median(v for v, _ in native["plain"]) if "plain" in native else None
    head = ("| config | mtp_cy tok/s | vs plain | native tok/s | native vs plain | mtp_cy/native | "
            "acceptance | notes |")
    print(head)
    print("|" + "---|" * 8)
    for cname, _ in configs:
        runs = ours[cname]
        tps = statistics.median(x["decode_tok_s"] for x in runs)
        acc_rate = statistics.median(x["st"]["acceptance_rate"] for x in runs)
        nat = statistics.median(v for v, _ in native[cname]) if cname in native else None
        note = ""
        entry = {"mtp_cy_tok_s": tps, "runs": [x["decode_tok_s"] for x in runs], "acceptance": acc_rate,
                 "native_tok_s": nat, "native_runs": [v for v, _ in native.get(cname, [])]}
        pol = policies.get(cname)
        if pol:
            total = sum(pol["chosen"].values()) or 1
            share = {k: v / total for k, v in pol["chosen"].items()}
            v1 = pol["plain_step_us"]
            ratio = pol["draft_token_us"] / v1 if v1 else 0
            note = ("chose " + ", ".join(f"{k}:{share[k]:.0%}" for k in sorted(share) if share[k] >= 0.01) +
                    f"; measured draft/target {ratio:.2f}")
            entry["policy_chosen"] = pol["chosen"]
            entry["measured_draft_ratio"] = ratio
        res["configs"][cname] = entry
        acc = f"{acc_rate * 100:.1f}%" if cname != "plain" else "-"
        vs = f"{tps / base:.2f}x" if base else "-"
        print(f"| {cname} | {tps:.2f} | {vs} | {'%.2f' % nat if nat else '-'} | "
              f"{'%.2fx' % (nat / nat_base) if nat and nat_base else '-'} | "
              f"{'%.2fx' % (tps / nat) if nat else '-'} | {acc} | {note} |", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--acceptance", type=float, default=0.75)
    ap.add_argument("--draft-confidence", type=float, default=0.58)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-upstream", action="store_true", help="only mtp_cy (no native comparison)")
    ap.add_argument("--native", choices=("openmp", "same"), default="openmp",
                    help="upstream's programs built as upstream builds them by default, with OpenMP "
                         "(default), or from mtp_cy's own build (ggml thread pools)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    configs = parse_configs(args.configs)
    print(f"# mtp_cy {mtp_cy.__version__}, llama.cpp {mtp_cy.llama_cpp_commit}; {mtp_cy.system_info()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}; {args.threads} threads; {args.max_tokens} tokens, greedy; "
          f"median of {args.repeats} interleaved repeats; command: {' '.join(sys.argv)}")
    spec = comp = None
    if not args.skip_upstream:
        spec, comp = (upstream_bin("llama-speculative-simple", args.native),
                      upstream_bin("llama-completion", args.native))
        print(f"# native programs: {spec.parent} ({'OpenMP, upstream default build' if args.native == 'openmp' else 'mtp_cy build, ggml thread pools'})")
    results = [bench_model(m.strip(), args, configs, spec, comp) for m in args.models.split(",") if m.strip()]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
