#!/usr/bin/env python3
"""MTP when sampling: plain decoding, upstream's exact-match rule and speculative (rejection)
sampling, side by side in one run, at several temperatures.

    python benchmarks/bench_sampling.py                          # flat tiny + dense-1.3b
    python benchmarks/bench_sampling.py --models dense-1.3b --temps 0,0.7,1.0 --repeats 3

Models (``mtp_cy.synthetic``, generated once and cached), both with ``spread=4``: the target
gives every word four plausible successors (logits 0, -0.5, -1, -1.5), so sampling really
samples, and the MTP head has a distribution of its own (``--acceptance``, default 0.75, of
its favourites are the target's):

* ``flat``: the tiny model with its own MTP head (its other candidates at random gaps);
* ``dense-1.3b``: the ~1.35B f16 preset (the MTP head shares the output head, as in real
  Qwen3.5), where a draft costs a small fraction of a target step.

Configurations: ``plain`` (a Session), and for each draft length (``--drafts``, ``auto``
included) the two rules ``match`` and ``rejection`` (``spec_sampling=``).  For each model and
temperature, every repeat runs every configuration once, interleaved (the order reversed on odd
repeats); each run is one call of ``--tokens`` tokens with its own seed (the same seeds for
every configuration).  Reported: median decode tok/s, the ratio to plain in the same run, the
acceptance, and acceptance by draft position; and for each rule, the share of the greedy
speedup it keeps at each temperature (best fixed length: (x_T - 1) / (x_greedy - 1)).
"""
from __future__ import annotations

import argparse
import json
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

PROMPT_WORDS = "the sea moon star"


def model_of(name: str, acceptance: float):
    if name == "flat":
        return synthetic.cached_model(mtp=True, acceptance=acceptance, spread=4)
    return synthetic.cached_model(preset=name, mtp=True, acceptance=acceptance, spread=4)


def one_run(engine, prompt, tokens, sampling, seed):
    engine.reset_stats()
    engine.clear_cache()
    t0 = time.perf_counter()
    n = sum(1 for _ in engine.stream(prompt, max_tokens=tokens, seed=seed, **sampling))
    wall = time.perf_counter() - t0
    st = engine.stats()
    decode_s = max(wall - st["timing_us"].get("prefill", 0) / 1e6, 1e-9)
    return dict(tok_s=n / decode_s, gen=st["drafts_generated"], acc=st["drafts_accepted"],
                gen_pos=st.get("drafts_generated_by_pos", []), acc_pos=st.get("drafts_accepted_by_pos", []))


def bench(name, args):
    t0 = time.perf_counter()
    sm = model_of(name, args.acceptance)
    print(f"\n## {name}: {sm.n_params / 1e6:.0f}M parameters, {sm.dtype} (ready in {time.perf_counter() - t0:.0f} s)",
          flush=True)
    prompt = sm.encode(PROMPT_WORDS)
    drafts = [d if d == "auto" else int(d) for d in args.drafts.split(",")]
    temps = [float(t) for t in args.temps.split(",")]
    configs = [("plain", None, None)]
    for d in drafts:
        for rule in ("match", "rejection"):
            configs.append((f"{rule}-{d}", d, rule))
    out = {"model": name, "params": sm.n_params, "temps": {}}
    with mtp_cy.Model(sm.path) as model:
        opts = dict(n_ctx=len(prompt) + args.tokens + 64, n_threads=args.threads)
        engines = {}
        for cname, d, rule in configs:
            engines[cname] = mtp_cy.Session(model, **opts) if d is None else \
                mtp_cy.MTP(model, n_draft=d, spec_sampling=rule, **opts)
        try:
            for temp in temps:
                sampling = dict(temp=temp, top_k=0, top_p=1.0, min_p=0.0)
                runs = {c: [] for c, _, _ in configs}
                for c, d, _ in configs:        # warm-up (auto learns this temperature)
                    one_run(engines[c], prompt, args.tokens if d == "auto" else 8, sampling, 999)
                for r in range(args.repeats):
                    for c, _, _ in (configs if r % 2 == 0 else configs[::-1]):
                        runs[c].append(one_run(engines[c], prompt, args.tokens, sampling, 1000 + r))
                base = statistics.median(x["tok_s"] for x in runs["plain"])
                print(f"\n### {name}, temp {temp:g} (top_k 0, top_p 1, min_p 0), {args.tokens} tokens, "
                      f"{args.repeats} repeats")
                print("| config | tok/s | vs plain | acceptance | acceptance by position |")
                print("|---|---:|---:|---:|---|")
                rows = {}
                for c, _, _ in configs:
                    xs = runs[c]
                    v = statistics.median(x["tok_s"] for x in xs)
                    gen, acc = sum(x["gen"] for x in xs), sum(x["acc"] for x in xs)
                    npos = max((len(x["gen_pos"]) for x in xs), default=0)
                    gp = [sum(x["gen_pos"][i] for x in xs if i < len(x["gen_pos"])) for i in range(npos)]
                    ap = [sum(x["acc_pos"][i] for x in xs if i < len(x["acc_pos"])) for i in range(npos)]
                    by_pos = " ".join(f"{a / g:.2f}" for g, a in zip(gp, ap) if g)
                    rows[c] = dict(tok_s=v, ratio=v / base, acceptance=acc / gen if gen else 0.0, by_pos=by_pos)
                    print(f"| {c} | {v:.1f} | {v / base:.2f}x | "
                          f"{(acc / gen if gen else 0.0):.3f} | {by_pos} |", flush=True)
                out["temps"][str(temp)] = rows
        finally:
            for e in engines.values():
                e.close()
    if "0.0" in out["temps"]:
        greedy = out["temps"]["0.0"]
        fixed = [f"{{}}-{d}" for d in drafts if d != "auto"]
        g_best = max(greedy[f.format("match")]["ratio"] for f in fixed) if fixed else None
        print(f"\n### {name}: share of the greedy speedup kept (best fixed length; auto in brackets)")
        for temp, rows in out["temps"].items():
            if temp == "0.0" or not g_best or g_best <= 1.0:
                continue
            parts = []
            for rule in ("match", "rejection"):
                best = max(rows[f.format(rule)]["ratio"] for f in fixed)
                a = rows.get(f"{rule}-auto", {}).get("ratio")
                parts.append(f"{rule} {(best - 1) / (g_best - 1) * 100:.0f}%"
                             + (f" [auto {a:.2f}x plain]" if a else ""))
            print(f"* temp {temp}: " + ", ".join(parts))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="flat,dense-1.3b")
    ap.add_argument("--temps", default="0,0.7,1.0")
    ap.add_argument("--drafts", default="1,2,3,auto")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--acceptance", type=float, default=0.75, help="the models' acceptance knob")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"# bench_sampling {time.strftime('%Y-%m-%d %H:%M')}: {' '.join(sys.argv[1:]) or '(defaults)'}")
    res = [bench(m.strip(), args) for m in args.models.split(",") if m.strip()]
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
