#!/usr/bin/env python3
"""The HTTP server: ``python -m mtp_cy serve`` against the in-process ``Batch`` and llama-server.

    python benchmarks/bench_server.py [--model dense-1.3b] [--conc 1,4,8] [--tokens 64]
                                      [--requests 2] [--repeats 2] [--threads N] [--n-draft auto]
                                      [--no-upstream] [--json out.json]

For each concurrency C, C clients (threads) each send ``--requests`` requests one after the other
(greedy, ``--tokens`` tokens, an 8-token prompt of token ids that no earlier request used, so no
prompt cache helps), streaming, and every token's arrival time is recorded.  Configurations:

* ``in-process``: ``Batch(n_seq=max C, n_draft=--n-draft)`` in this process, ``Batch.stream``
  from the client threads (what the server adds nothing to);
* ``mtp_cy serve``: ``python -m mtp_cy serve MODEL --n-seq <max C> --n-draft <--n-draft>`` in a
  subprocess, ``POST /v1/completions`` with ``stream: true`` (server-sent events);
* ``serve plain``: the same with ``--n-draft 0`` (the batching alone);
* ``llama-server plain`` / ``llama-server mtp``: upstream's llama-server built from the vendored
  source with mtp_cy's patches (``vendor/native_build.upstream_server``), ``-np <max C>``
  (``--spec-type draft-mtp --spec-draft-n-max 3`` for ``mtp``), the same threads, the same
  streaming ``/v1/completions`` requests.

All the servers run at once (idle while another is measured), so each repeat measures every
configuration at every C in an order that alternates between repeats; the ratios are medians of
per-repeat ratios (the speed of these VMs drifts between processes).  Reported per configuration
and C: aggregate tok/s (every token over the wall time of the round), ``x`` = over ``llama-server
plain`` at the same C, time to first token p50 / p90 (from sending the request), and the
inter-token latency p50 / p90 (per request: (last token - first token) / (tokens - 1)).
``overhead`` is ``1 - mtp_cy serve / in-process`` (HTTP, JSON and the event loop).  Run on a
quiet machine.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import model_of, server_exe  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess on 127.0.0.1 that answers ``GET /health`` for the duration of a ``with``."""

    def __init__(self, name, cmd, port):
        self.name, self.cmd, self.port = name, cmd, port

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < 300:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return self
            except OSError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError(f"{self.name} did not start: {' '.join(self.cmd)}")

    def stream(self, prompt, n):
        """One streaming /v1/completions request: (send time, token arrival times)."""
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "top_k": 1,
                           "stream": True, "stream_options": {"include_usage": True}})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {r.status}: {r.read()[:300]!r}")
        times, n_usage = [], None
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            ch = json.loads(data)
            now = time.perf_counter()
            if ch.get("usage"):
                n_usage = ch["usage"].get("completion_tokens")
            for choice in ch.get("choices") or ():
                if choice.get("text"):
                    times.append(now)
        c.close()
        if n_usage is not None and n_usage > len(times) and times:
            # several tokens in one event (or a character split over tokens): spread them
            times = times + [times[-1]] * (n_usage - len(times))
        return t0, times

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return False


class InProcess:
    name = "in-process"

    def __init__(self, batch):
        self.batch = batch

    def stream(self, prompt, n):
        t0 = time.perf_counter()
        times = []
        for _ in self.batch.stream(prompt, max_tokens=n, temp=0):
            times.append(time.perf_counter())
        return t0, times


def run_round(target, prompts, n, per_client):
    """C clients (len(prompts) // per_client), each ``per_client`` requests in a row."""
    c = len(prompts) // per_client
    recs = [None] * len(prompts)
    bar = threading.Barrier(c + 1)
    errs = []

    def client(k):
        bar.wait()
        try:
            for j in range(per_client):
                i = k * per_client + j
                recs[i] = target.stream(prompts[i], n)
        except BaseException as exc:      # noqa: BLE001 - reported below
            errs.append(exc)
    ts = [threading.Thread(target=client, args=(k,)) for k in range(c)]
    for t in ts:
        t.start()
    bar.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errs:
        raise errs[0]
    tokens = sum(len(r[1]) for r in recs)
    ttft = [r[1][0] - r[0] for r in recs if r[1]]
    itl = [(r[1][-1] - r[1][0]) / (len(r[1]) - 1) for r in recs if len(r[1]) > 1]
    return {"tok_s": tokens / wall, "ttft": ttft, "itl": itl, "tokens": tokens}


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return 0.0
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dense-1.3b", help="tiny, bench or a synthetic preset (default %(default)s)")
    ap.add_argument("--conc", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="threads per engine (0: every CPU)")
    ap.add_argument("--n-draft", default="auto")
    ap.add_argument("--no-upstream", action="store_true", help="leave upstream's llama-server out")
    ap.add_argument("--json")
    args = ap.parse_args()
    sm = model_of(args.model)
    conc = [int(x) for x in args.conc.split(",")]
    n_seq = max(conc)
    n_ctx = 512
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    n_draft = args.n_draft if args.n_draft == "auto" else int(args.n_draft)
    ours = lambda port, k: [sys.executable, "-m", "mtp_cy", "serve", str(sm.path), "--port", str(port),  # noqa: E731
                            "--n-seq", str(n_seq), "--n-draft", str(k), "--n-ctx", str(n_ctx * n_seq),
                            "--threads", str(threads), "--log-level", "warning", "--cache-ram", "0",
                            "--model-alias", "m"]
    procs = []
    p = free_port()
    procs.append(Proc("mtp_cy serve", ours(p, n_draft), p))
    p = free_port()
    procs.append(Proc("serve plain", ours(p, 0), p))
    if not args.no_upstream:
        exe = server_exe()
        for mtp in (False, True):
            p = free_port()
            cmd = [str(exe), "-m", str(sm.path), "-np", str(n_seq), "-c", str(n_ctx * n_seq), "--host", "127.0.0.1",
                   "--port", str(p), "-t", str(threads), "-tb", str(threads), "--no-webui", "-lv", "0",
                   "--no-cache-prompt", "--cache-ram", "0", "--alias", "m"]
            if mtp:
                cmd += ["--spec-type", "draft-mtp", "--spec-draft-n-max", "3"]
            procs.append(Proc("llama-server mtp" if mtp else "llama-server plain", cmd, p))
    ids = sm.token_ids
    counter = [0]

    def prompts(k):
        out = []
        for _ in range(k):
            i = counter[0]
            counter[0] += 1
            out.append([ids[(7 * i + 3 * j + i // len(ids)) % len(ids)] for j in range(8)])
        return out

    res = {}
    with mtp_cy.Model(sm.path) as m, mtp_cy.Batch(m, n_seq=n_seq, n_draft=n_draft, n_ctx=n_ctx * n_seq,
                                                 n_threads=threads, cache_ram=0) as b:
        targets = [InProcess(b)]
        started = []
        try:
            for pr in procs:
                started.append(pr.__enter__())
            targets += started
            names = [t.name for t in targets]
            res = {c: {nm: [] for nm in names} for c in conc}
            for t in targets:                   # warm up (and let auto measure)
                run_round(t, prompts(n_seq), args.tokens, 1)
            for r in range(args.repeats):
                for c in conc:
                    order = targets if r % 2 == 0 else targets[::-1]
                    for t in order:
                        res[c][t.name].append(run_round(t, prompts(c * args.requests), args.tokens, args.requests))
                        sys.stderr.write(f"\rrepeat {r + 1}/{args.repeats}, {c} clients, {t.name:<20}")
                        sys.stderr.flush()
            sys.stderr.write("\r\x1b[K")
        finally:
            for pr in started:
                pr.__exit__(None, None, None)
    base = "llama-server plain" if not args.no_upstream else "serve plain"
    print(f"\n{args.model}: {args.tokens} tokens per request, {args.requests} requests per client, n_seq {n_seq}, "
          f"threads {threads}, n_draft {args.n_draft}, {args.repeats} repeats "
          f"({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"tok/s (x {base} at the same clients), TTFT p50/p90 ms, inter-token latency p50/p90 ms")
    out = {}
    for c in conc:
        print(f"\n{c} client(s)")
        out[c] = {}
        for nm in names:
            rs = res[c][nm]
            tps = statistics.median(x["tok_s"] for x in rs)
            ratio = statistics.median(x["tok_s"] / y["tok_s"] for x, y in zip(rs, res[c][base]))
            ttft = [v for x in rs for v in x["ttft"]]
            itl = [v for x in rs for v in x["itl"]]
            row = {"tok_s": round(tps, 2), "x_base": round(ratio, 3),
                   "ttft_ms": [round(1e3 * pct(ttft, .5), 1), round(1e3 * pct(ttft, .9), 1)],
                   "itl_ms": [round(1e3 * pct(itl, .5), 1), round(1e3 * pct(itl, .9), 1)]}
            out[c][nm] = row
            print(f"  {nm:<20} {tps:8.1f} tok/s {ratio:5.2f}x   TTFT {row['ttft_ms'][0]:7.1f} / {row['ttft_ms'][1]:7.1f}"
                  f"   ITL {row['itl_ms'][0]:6.1f} / {row['itl_ms'][1]:6.1f}")
        ov = statistics.median(1 - x["tok_s"] / y["tok_s"] for x, y in zip(res[c]["mtp_cy serve"], res[c]["in-process"]))
        out[c]["overhead"] = round(ov, 4)
        print(f"  HTTP overhead (1 - mtp_cy serve / in-process): {100 * ov:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                               "results": out}, indent=1))


if __name__ == "__main__":
    main()
