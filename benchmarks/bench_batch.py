#!/usr/bin/env python3
"""Many concurrent calls: ``mtp_cy.Batch`` against separate ``MTP`` sessions in threads.

    python benchmarks/bench_batch.py [--models tiny,bench] [--conc 1,2,4,8] [--tokens 64]
                                     [--repeats 2] [--threads N] [--json out.json]
                                     [--configs "batch plain,batch auto"]

For each model and each concurrency C (C calls started at once from C threads, greedy, each with
its own prompt and ``--tokens`` tokens), the aggregate tokens per second over the wall time of:

* ``batch plain``: ``Batch(n_seq=max C, n_draft=0)``;
* ``batch k=3``: ``Batch(n_draft=3)``;
* ``batch auto``: ``Batch(n_draft="auto")``;
* ``sessions auto``: C separate ``MTP(n_draft="auto")`` sessions, one per thread (today's way);
* ``server plain`` / ``server mtp``: upstream's llama-server built from the vendored source with
  mtp_cy's patches (``vendor/native_build.upstream_server``, the first run builds it), started on
  127.0.0.1 with ``-np <max C>`` (``--spec-type draft-mtp --spec-draft-n-max 3`` for ``mtp``), the
  same threads, measured the same way (C concurrent ``/completion`` requests with the token ids,
  ``n_predict``, temperature 0, no prompt cache); ``--no-server`` leaves it out.

Every configuration runs once per repeat, in an order that alternates between repeats, and the
ratios (``x plain``: against ``batch plain`` at the same C, in the same repeat) are the medians of
the per-repeat ratios: on these VMs the speed drifts by +-20% between processes and calls, and a
ratio taken within one run cancels most of it.  ``gain`` is each configuration's C-call speed over
its own 1-call speed (the scaling the issue compares with llama-server's -np N / 1).  Run on a
quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import mtp_cy
except ImportError:
    sys.path.insert(0, str(ROOT))
    import mtp_cy  # noqa: E402
from mtp_cy import synthetic  # noqa: E402

CONFIGS = ("batch plain", "batch k=3", "batch auto", "sessions auto")
SERVER_CONFIGS = ("server plain", "server mtp")


class Server:
    """llama-server on 127.0.0.1 (a free port) for the duration of a ``with``."""

    def __init__(self, exe, model, n_seq, n_ctx, threads, mtp):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.cmd = [str(exe), "-m", str(model), "-np", str(n_seq), "-c", str(n_ctx * n_seq),
                    "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads), "-tb", str(threads),
                    "--no-webui", "-lv", "0"]
        if mtp:
            self.cmd += ["--spec-type", "draft-mtp", "--spec-draft-n-max", "3"]

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except Exception:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError(f"llama-server did not start: {' '.join(self.cmd)}")

    def complete(self, prompt, n):
        body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False,
                           "top_k": 1}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["tokens_predicted"]

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return False


def server_exe():
    sys.path.insert(0, str(ROOT / "vendor"))
    import native_build
    return native_build.upstream_server(ROOT)


def model_of(spec):
    """``name`` or ``name:dtype`` (e.g. ``moe-2.3b-a0.6b:q4_k_m``): a size or a preset."""
    name, _, dtype = spec.partition(":")
    kw = dict(dtype=dtype) if dtype else {}
    if name in ("tiny", "bench"):
        return synthetic.cached_model(size=name, mtp=True, acceptance=0.75, **kw)
    return synthetic.cached_model(preset=name, mtp=True, acceptance=0.75, **kw)


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
    mine = tuple(c for c in CONFIGS if c in args.configs)
    configs = mine + tuple(c for c in SERVER_CONFIGS if args.server and c in args.configs)
    res = {c: {k: [] for k in configs} for c in conc}
    kw = dict(n_ctx=n_ctx * n_seq, n_threads=args.threads) if args.threads else dict(n_ctx=n_ctx * n_seq)
    skw = dict(n_ctx=n_ctx, n_threads=args.threads) if args.threads else dict(n_ctx=n_ctx)
    with mtp_cy.Model(sm.path) as m:
        drafts = {"batch plain": 0, "batch k=3": 3, "batch auto": "auto"}
        engines = {c: mtp_cy.Batch(m, n_seq=n_seq, n_draft=drafts[c], **kw) for c in mine if c in drafts}
        sessions = ([mtp_cy.MTP(m, n_draft="auto", cache_prompt=False, **skw) for _ in range(n_seq)]
                    if "sessions auto" in mine else [])
        try:
            for e in engines.values():     # warm up (and let auto measure)
                run_concurrent(lambda i, e=e: len(e.complete(prompts_of(sm, n_seq)[i], max_tokens=args.tokens,
                                                             temp=0).tokens), n_seq)
            for r in range(args.repeats):
                for c in conc:
                    ps = prompts_of(sm, c)
                    order = list(mine) if r % 2 == 0 else list(reversed(mine))
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
    if args.server:
        threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
        for cfg in (c for c in SERVER_CONFIGS if c in configs):
            with Server(args.server, sm.path, n_seq, n_ctx, threads, cfg == "server mtp") as srv:
                run_concurrent(lambda i: srv.complete(prompts_of(sm, n_seq)[i], args.tokens), n_seq)
                for r in range(args.repeats):
                    for c in conc:
                        ps = prompts_of(sm, c)
                        tok, wall = run_concurrent(lambda i: srv.complete(ps[i], args.tokens), c)
                        res[c][cfg].append(tok / wall)
    out = {}
    print(f"\n{name}: {args.tokens} tokens per call, n_seq {n_seq}, threads {args.threads or 'all'}")
    print("tok/s (x batch plain at the same number of calls; gain = over its own 1-call speed)")
    print(f"{'calls':>5} " + " ".join(f"{c:>26}" for c in configs))
    for c in conc:
        row = {}
        cells = []
        for cfg in configs:
            tps = statistics.median(res[c][cfg])
            ratio = statistics.median(a / b for a, b in zip(res[c][cfg], res[c]["batch plain"]))
            gain = tps / statistics.median(res[conc[0]][cfg])
            row[cfg] = {"tok_s": round(tps, 1), "x_plain": round(ratio, 3), "gain": round(gain, 3)}
            cells.append(f"{tps:8.1f} {ratio:5.2f}x g{gain:5.2f}")
        out[c] = row
        print(f"{c:>5} " + " ".join(f"{x:>26}" for x in cells))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny", help="comma-separated sizes / presets, each NAME or NAME:DTYPE")
    ap.add_argument("--configs", default=",".join(CONFIGS + SERVER_CONFIGS),
                    help="comma-separated subset of: " + ", ".join(CONFIGS + SERVER_CONFIGS) + " (batch plain is always run)")
    ap.add_argument("--conc", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="threads per engine (0: every CPU)")
    ap.add_argument("--no-server", action="store_true", help="leave upstream's llama-server out")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.configs = {"batch plain"} | {c.strip() for c in args.configs.split(",") if c.strip()}
    unknown = args.configs - set(CONFIGS + SERVER_CONFIGS)
    if unknown:
        ap.error(f"unknown configs: {sorted(unknown)}")
    want_server = not args.no_server and bool(args.configs & set(SERVER_CONFIGS))
    args.server = server_exe() if want_server else None
    allres = {name: bench_model(name, args) for name in args.models.split(",")}
    if args.json:
        meta = dict(vars(args), server=str(args.server) if args.server else None, configs=sorted(args.configs))
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                               "args": meta, "results": allres}, indent=1))


if __name__ == "__main__":
    main()
