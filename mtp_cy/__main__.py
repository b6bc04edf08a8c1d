"""Command line: ``python -m mtp_cy {demo,run,serve,bench,info,rpc-server}`` (also installed as ``mtp-cy``).

* ``demo``: generate (once, then cached) a small synthetic MTP model, stream an
  MTP generation (``--n-draft auto`` by default) with a live statistics line,
  then print a summary, one line comparing MTP with plain decoding on this
  machine (and what ``auto`` chose), and a check that the text equals plain
  greedy decoding of the same model.
* ``run MODEL.gguf "prompt"``: stream from any GGUF (MTP when the model has an
  MTP head -- its own, or a sidecar given with ``--mtp-head`` -- plain decoding
  otherwise or with ``--plain``).
* ``serve MODEL.gguf``: an OpenAI-compatible HTTP server on :class:`mtp_cy.Batch`
  (see :mod:`mtp_cy.server`; needs ``pip install "mtp_cy[server]"``).
* ``bench MODEL.gguf``: plain vs MTP (``--n-draft 1,2,3,4,auto``) side by side.
* ``info``: versions, CPU features and backend devices.
* ``rpc-server``: serve this machine's devices to other hosts with llama.cpp's
  RPC server, so that ``Model(path, rpc_servers=["this-host:50052"])`` (or
  ``--rpc`` on the other commands) can place model layers here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from typing import List, Optional, Sequence

DEMO_PROMPT = "the sea"


# ----------------------------------------------------------------------------- display

class LiveView:
    """Streams text to stdout with a statistics line kept below it (ANSI terminals).

    When stdout is not a terminal the text is written plainly and the
    statistics line is not drawn (the summary still is).
    """

    def __init__(self, engine, out=None, every: int = 1, live: Optional[bool] = None):
        self.engine = engine
        self.out = out or sys.stdout
        self.live = self.out.isatty() and os.environ.get("TERM") != "dumb" if live is None else live
        self.width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        self.cur = ""
        self.every = max(1, every)
        self.n = 0
        self.t0 = time.perf_counter()
        self.started = False

    def _stats_line(self) -> str:
        st = self.engine.stats()
        el = time.perf_counter() - self.t0
        line = (f"[{st['tokens_emitted']} tok | {st['tokens_emitted'] / el if el > 0 else 0:.0f} tok/s | "
                f"iters {st['iters']} | drafted {st['drafts_generated']} | accepted {st['drafts_accepted']} "
                f"({st['acceptance_rate'] * 100:.0f}%)]")
        return line[: self.width]

    def _draw(self, commit: Sequence[str] = ()):
        w = self.out.write
        if self.started:
            w("\x1b[A\r\x1b[K")            # up to the text row
        for line in commit:
            w(line + "\n\x1b[K")
        w(self.cur + "\n\r\x1b[K" + "\x1b[2m" + self._stats_line() + "\x1b[0m")
        self.out.flush()
        self.started = True

    def piece(self, text: str):
        self.n += 1
        if not self.live:
            self.out.write(text)
            self.out.flush()
            return
        commit = []
        for i, part in enumerate(text.split("\n")):
            if i > 0:                      # a newline inside the piece ends the row
                commit.append(self.cur)
                self.cur = ""
            self.cur += part
            while len(self.cur) > self.width:
                cut = self.cur.rfind(" ", 0, self.width)
                cut = cut if cut > 0 else self.width
                commit.append(self.cur[:cut])
                self.cur = self.cur[cut:].lstrip(" ")
        if commit or self.n % self.every == 0:
            self._draw(commit)

    def finish(self):
        if self.live:
            self._draw()
            self.out.write("\n")
        else:
            self.out.write("\n")
        self.out.flush()


def _summary(st: dict, wall: float, err=None) -> str:
    t = st["timing_us"]
    rows = [
        ("tokens emitted", f"{st['tokens_emitted']}"),
        ("verification passes (iters)", f"{st['iters']}"),
        ("drafts generated / accepted", f"{st['drafts_generated']} / {st['drafts_accepted']}"),
        ("acceptance rate", f"{st['acceptance_rate'] * 100:.1f}%"),
        ("tokens per iteration", f"{st['tokens_emitted'] / st['iters']:.2f}" if st["iters"] else "-"),
        ("decode speed (native loop)", f"{st['tokens_per_sec']:.1f} tok/s"),
        ("time: prefill / draft / verify / sample",
         f"{t['prefill'] / 1e3:.1f} / {t['draft'] / 1e3:.1f} / {t['verify'] / 1e3:.1f} / {t['sample'] / 1e3:.1f} ms"),
        ("wall time", f"{wall:.2f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def _sampling_from(args) -> dict:
    o = {"temp": args.temp}
    if args.seed is not None:
        o["seed"] = args.seed
    for k in ("top_k", "top_p", "min_p"):
        v = getattr(args, k, None)
        if v is not None:
            o[k] = v
    return o


def _rpc_list(value: Optional[str]) -> Optional[List[str]]:
    if not value:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def _load(path, args):
    import mtp_cy
    kw = {"progress": not args.quiet and sys.stderr.isatty()}
    if getattr(args, "mtp_head", None):
        kw["mtp_head"] = args.mtp_head
    if getattr(args, "n_gpu_layers", None) is not None:
        kw["n_gpu_layers"] = args.n_gpu_layers
    if getattr(args, "rpc", None):
        kw["rpc_servers"] = _rpc_list(args.rpc)
    return mtp_cy.Model(path, **kw)


def _ctx_opts(args) -> dict:
    o = {"n_ctx": args.n_ctx}
    if args.threads is not None:
        o["n_threads"] = args.threads
    return o


# ----------------------------------------------------------------------------- commands

def _draft_desc(n_draft) -> str:
    return "n_draft=auto" if n_draft == "auto" else f"n_draft={n_draft}"


def _policy_line(st: dict) -> str:
    """What n_draft="auto" chose, and why, in one phrase."""
    pol = st.get("policy")
    if not pol:
        return ""
    chosen = pol["chosen"]
    total = sum(chosen.values()) or 1
    plain = chosen.get(0, 0) / total
    v1 = pol["plain_step_us"]
    ratio = pol["draft_token_us"] / v1 if v1 else 0.0
    if plain >= 0.5:
        return (f"auto decoded plainly in {plain:.0%} of the iterations: a draft token costs {ratio:.2f}x a "
                f"target step here, so drafting does not pay (it still probes now and then)")
    k = max((k for k in chosen if k), key=lambda k: chosen[k])
    return (f"auto drafted {k} token(s) most of the time ({chosen[k] / total:.0%} of the iterations; "
            f"a draft token costs {ratio:.2f}x a target step here)")


def _with_progress(fn, label: str, quiet: bool = False, every: float = 0.5):
    """Run ``fn()`` in a worker thread while stderr shows ``label`` and the seconds elapsed
    (a line that updates itself on a terminal, a line every few seconds otherwise); only once
    it has taken longer than ``every``.  Returns what ``fn`` returned, raises what it raised."""
    import threading
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised on the calling thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    t.start()
    tty = sys.stderr.isatty()
    shown = False
    last = 0.0
    while t.is_alive():
        t.join(every)
        el = time.perf_counter() - t0
        if quiet or not t.is_alive():
            continue
        if tty:
            sys.stderr.write(f"\r\x1b[K{label} ... {el:.0f} s")
            shown = True
        elif el - last >= 5.0:
            sys.stderr.write(f"{label} ... {el:.0f} s\n")
            last = el
        sys.stderr.flush()
    if shown:
        sys.stderr.write("\r\x1b[K")
    if "error" in out:
        raise out["error"]
    return out["value"]


def cmd_demo(args) -> int:
    import mtp_cy
    from mtp_cy import synthetic
    err = sys.stderr
    err.write(f"mtp_cy {mtp_cy.__version__} (llama.cpp {mtp_cy.llama_cpp_commit}) - "
              f"synthetic MTP demo model (acceptance {args.acceptance:.2f}, size {args.size})\n")
    t0 = time.perf_counter()
    sm = _with_progress(lambda: synthetic.cached_model(mtp=True, acceptance=args.acceptance, size=args.size),
                        "building the synthetic demo model (first run only; cached afterwards)", args.quiet)
    err.write(f"model: {sm.path} ({sm.n_params / 1e6:.1f}M params, ready in {time.perf_counter() - t0:.1f} s)\n")
    with _load(sm.path, args) as model, mtp_cy.MTP(model, n_draft=args.n_draft, **_ctx_opts(args)) as mtp, \
            mtp_cy.Session(model, **_ctx_opts(args)) as plain:
        prompt = args.prompt
        err.write(f"prompt: {prompt!r}   {_draft_desc(args.n_draft)}  max_tokens={args.max_tokens}\n\n")
        view = LiveView(mtp, every=args.stats_every, live=False if args.quiet else None)
        t0 = time.perf_counter()
        parts = []
        try:
            for piece in mtp.stream(prompt, max_tokens=args.max_tokens, temp=0):
                parts.append(piece)
                view.piece(piece)
        finally:
            view.finish()
        wall = time.perf_counter() - t0
        st = mtp.stats()
        if not args.quiet:
            print("\nsummary:")
            print(_summary(st, wall))
        # the promise of speculative decoding: the same text as plain decoding (and, with a
        # fixed n_draft, the counters that the synthetic model's oracle predicts)
        plain_text = plain.generate(prompt, max_tokens=args.max_tokens, temp=0)
        same = plain_text == "".join(parts)
        exact = True
        if args.n_draft != "auto":
            want = sm.predict(model.tokenize(prompt), args.max_tokens, args.n_draft, n_ctx=mtp.n_ctx)
            exact = (want.iters, want.drafts_generated, want.drafts_accepted, want.tokens_emitted) == \
                    (st["iters"], st["drafts_generated"], st["drafts_accepted"], st["tokens_emitted"])
        # MTP against plain decoding on this machine, side by side: rounds in the order
        # M P / P M / M P / P M (neither engine always runs first or after the other), the
        # median of each, so that the order of the runs cannot tilt the ratio
        runs = {"mtp": [], "plain": []}
        order = (("mtp", mtp), ("plain", plain))
        n_rounds = 4
        for r in range(n_rounds):
            for name, eng in (order if r % 2 == 0 else order[::-1]):
                if not args.quiet:
                    err.write(f"\r\x1b[Kcomparing MTP with plain decoding: round {r + 1}/{n_rounds} ({name})"
                              if err.isatty() else "")
                    err.flush()
                t1 = time.perf_counter()
                n = len(eng.complete(prompt, max_tokens=args.max_tokens, temp=0).tokens)
                runs[name].append(n / (time.perf_counter() - t1))
        if not args.quiet and err.isatty():
            err.write("\r\x1b[K")
        speed = {k: statistics.median(v) for k, v in runs.items()}
        ratio = speed["mtp"] / speed["plain"] if speed["plain"] else 0.0
        print(f"\non this machine: MTP ({_draft_desc(args.n_draft)}) {speed['mtp']:.0f} tok/s, plain decoding "
              f"{speed['plain']:.0f} tok/s (medians of {n_rounds} alternating runs) -> {ratio:.2f}x. " + (_policy_line(mtp.stats()) or
              ("MTP pays when a draft token costs a small fraction of a target step (large, memory-bound "
               "models); on a tiny model it rarely does: try --n-draft auto")))
        print(f"  {'identical to plain greedy text':<39}  {'yes' if same else 'NO'}")
        if args.n_draft != "auto":
            print(f"  {'statistics equal the oracle':<39}  {'yes' if exact else 'NO'}")
        if args.upstream_stats:
            mtp.print_stats()
    return 0 if (same and exact) else 1


def cmd_run(args) -> int:
    import mtp_cy
    model = _load(args.model, args)
    with model:
        use_mtp = model.has_mtp and not args.plain
        if not use_mtp and not args.plain and not args.quiet:
            sys.stderr.write("note: this model has no MTP head; using plain decoding\n")
        if use_mtp and not args.quiet:
            src = f"the sidecar {model.mtp_head}" if model.mtp_source == "sidecar" else "the model file"
            sys.stderr.write(f"MTP head: {src} ({model.n_layer_nextn} NextN layer(s)), "
                             f"{_draft_desc(args.n_draft)}\n")
        eng = (mtp_cy.MTP(model, n_draft=args.n_draft, **_ctx_opts(args)) if use_mtp
               else mtp_cy.Session(model, **_ctx_opts(args)))
        with eng:
            view = LiveView(eng, every=args.stats_every, live=False if args.quiet else None)
            t0 = time.perf_counter()
            try:
                for piece in eng.stream(args.prompt, max_tokens=args.max_tokens, **_sampling_from(args)):
                    view.piece(piece)
            except KeyboardInterrupt:
                view.finish()
                sys.stderr.write("interrupted\n")
                return 130
            view.finish()
            if not args.quiet:
                sys.stderr.write("\n" + _summary(eng.stats(), time.perf_counter() - t0) + "\n")
    return 0


def _byte_size(s):
    """``1073741824``, ``512M``, ``2G``, ``0`` (bytes; K/M/G/T are powers of 1024)."""
    t = s.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a size in bytes (e.g. 512M, 2G), got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s!r}")
    return int(v * mult)


def _n_draft0(s):
    """``auto`` or an int >= 0 (0: plain decoding)."""
    if s == "auto":
        return s
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 0, got {s!r}")
    return v


def cmd_serve(args) -> int:
    import logging
    try:
        from mtp_cy import server
        server._need_server_extra()
    except ImportError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                            format="%(asctime)s %(name)s: %(levelname)s: %(message)s")
    opts = {"n_seq": args.n_seq, "n_draft": args.n_draft, "n_ctx": args.n_ctx, "mtp_head": args.mtp_head,
            "api_key": args.api_key, "model_alias": args.model_alias, "max_queue": args.max_queue,
            "max_body_bytes": args.max_body_bytes, "timeout": args.timeout, "n_gpu_layers": args.n_gpu_layers}
    if args.cache_ram is not None:
        opts["cache_ram"] = args.cache_ram
    if args.threads is not None:
        opts["n_threads"] = args.threads
    return server.serve(args.model, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
                        log_level=args.log_level, **opts)


def cmd_bench(args) -> int:
    from mtp_cy.bench import format_table, measure
    model = _load(args.model, args)
    with model:
        drafts = [_n_draft(x.strip()) for x in args.n_draft.split(",") if x.strip()] if model.has_mtp else []
        if not model.has_mtp:
            sys.stderr.write("note: this model has no MTP head; measuring plain decoding only\n")

        def prog(msg):
            if not args.quiet:
                sys.stderr.write(f"\r\x1b[K{msg}" if sys.stderr.isatty() else msg + "\n")
                sys.stderr.flush()
        rows = measure(model, args.prompt, max_tokens=args.max_tokens, n_drafts=drafts,
                       repeats=args.repeats, n_threads=args.threads, progress=prog)
        if sys.stderr.isatty() and not args.quiet:
            sys.stderr.write("\r\x1b[K")
        print(f"{model!r}\nprompt {args.prompt!r}, {args.max_tokens} tokens, greedy, "
              f"median of {args.repeats} interleaved runs\n")
        print(format_table(rows))
    return 0


def cmd_info(args) -> int:
    import mtp_cy
    mtp_cy.init()
    print(f"mtp_cy {mtp_cy.__version__}, llama.cpp {mtp_cy.llama_cpp_commit}")
    print(f"system: {mtp_cy.system_info()}")
    for d in mtp_cy.devices(_rpc_list(args.rpc)):
        mem = f", {d['memory_total'] / 2**30:.1f} GiB" if d.get("memory_total") else ""
        state = " (not answering)" if d.get("available") is False else ""
        print(f"device: {d['name']} ({d['type']}): {d['description']}{mem}{state}")
    return 0


RPC_SECURITY_WARNING = """\
WARNING: the RPC server listens on {addr}, which is not a loopback address.
         llama.cpp's RPC protocol has no authentication and no encryption:
         anyone who can reach this port can allocate memory and run
         computations on this machine, and read or write what is stored there.
         Only do this on a trusted private network (or behind a firewall / an
         SSH tunnel); bind to 127.0.0.1 otherwise.
"""


def rpc_bind_warning(host: str) -> Optional[str]:
    """The security warning printed when ``rpc-server`` binds to a non-loopback address (else None)."""
    import ipaddress
    import socket
    try:
        ip = socket.gethostbyname(host)
    except (OSError, UnicodeError):
        return None            # rpc_server() reports the bad host
    if ipaddress.ip_address(ip).is_loopback:
        return None
    return RPC_SECURITY_WARNING.format(addr=f"{host} ({ip})" if ip != host else ip)


def _flush_c_stdio():
    """Flush the C library's stdio buffers (upstream's server prints with printf)."""
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def cmd_rpc_server(args) -> int:
    import logging
    import signal
    import threading
    import mtp_cy
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    warning = rpc_bind_warning(args.host)
    if warning:
        sys.stderr.write(warning)
        sys.stderr.flush()
    outcome = {}

    def serve():
        try:
            mtp_cy.rpc_server(args.host, args.port, threads=args.threads, cache_dir=args.cache,
                              devices=_rpc_list(args.device))
        except BaseException as exc:            # reported by the main thread
            outcome["error"] = exc

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, terminate)
    sys.stderr.write(f"mtp_cy {mtp_cy.__version__} rpc-server on {args.host}:{args.port} "
                     f"(llama.cpp {mtp_cy.llama_cpp_commit}); Ctrl-C or SIGTERM stops it\n")
    sys.stderr.flush()
    # upstream's server loop has no stop function: it runs in a daemon thread, and
    # the process ends when a signal arrives (the operating system closes the
    # sockets; clients see the connection close)
    t = threading.Thread(target=serve, name="mtp_cy-rpc-server", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.25)
    except KeyboardInterrupt:
        sys.stderr.write("rpc-server: stopped\n")
        sys.stdout.flush()
        sys.stderr.flush()
        _flush_c_stdio()
        os._exit(0)
    _flush_c_stdio()
    exc = outcome.get("error")
    if exc is None:
        return 0
    if isinstance(exc, (mtp_cy.MTPError, ValueError, TypeError, OSError)):
        sys.stderr.write(f"error: {exc}\n")
        return 2
    raise exc


# ----------------------------------------------------------------------------- parser

def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _n_draft(s):
    """``auto`` or a positive int."""
    if s == "auto":
        return s
    try:
        return _positive_int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 1, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtp_cy",
                                description="MTP speculative decoding over llama.cpp (mtp_cy).")
    sub = p.add_subparsers(dest="command", metavar="{demo,run,serve,bench,info,rpc-server}")
    sub.required = True
    rpc_help = "comma-separated RPC servers host:port (python -m mtp_cy rpc-server) to place layers on"

    def common(sp, n_ctx=2048):
        sp.add_argument("--rpc", default=None, metavar="SERVERS", help=rpc_help)
        sp.add_argument("--n-ctx", type=_positive_int, default=n_ctx, help="context size (default %(default)s)")
        sp.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: every CPU this process may use)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar, live line or summary")

    d = sub.add_parser("demo", help="stream from a synthetic MTP model with live statistics")
    d.add_argument("--n-draft", type=_n_draft, default="auto",
                   help="draft length, or 'auto' to let the loop choose (default %(default)s)")
    d.add_argument("--max-tokens", type=_positive_int, default=160)
    d.add_argument("--acceptance", type=float, default=0.75, help="fraction of drafts that are right")
    d.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="tiny (~21.5 MB, 10M params) or bench (~480 MB, 239M params)")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--stats-every", type=_positive_int, default=1, help="redraw the statistics every N tokens")
    d.add_argument("--upstream-stats", action="store_true", help="also log llama.cpp's own speculative summary")
    common(d)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="stream a completion from a GGUF model")
    r.add_argument("model", help="path to a .gguf file")
    r.add_argument("prompt")
    r.add_argument("--n-draft", type=_n_draft, default="auto",
                   help="draft length, or 'auto' to let the loop choose (default %(default)s)")
    r.add_argument("--mtp-head", default=None, metavar="GGUF",
                   help="an MTP sidecar (mtp-<name>.gguf) for a model file without MTP layers")
    r.add_argument("--max-tokens", type=_positive_int, default=256)
    r.add_argument("--temp", type=float, default=0.8)
    r.add_argument("--top-k", type=int, default=None)
    r.add_argument("--top-p", type=float, default=None)
    r.add_argument("--min-p", type=float, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--plain", action="store_true", help="plain decoding even when the model has an MTP head")
    r.add_argument("--n-gpu-layers", type=int, default=None, help="layers to offload (-1 = all, default)")
    r.add_argument("--stats-every", type=_positive_int, default=4)
    common(r)
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the batch engine (mtp_cy[server])",
                       description="Serve a GGUF model over HTTP with OpenAI's API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models, /health, /metrics) on one mtp_cy.Batch: up "
                                   "to --n-seq requests generate together in one batched MTP loop.")
    v.add_argument("model", help="path to a .gguf file")
    v.add_argument("--mtp-head", default=None, metavar="GGUF", help="an MTP sidecar for a model without MTP layers")
    v.add_argument("--n-seq", type=_positive_int, default=4, help="requests generating at once (default %(default)s)")
    v.add_argument("--n-draft", type=_n_draft0, default="auto",
                   help="draft length: 'auto', 0 (plain) or an int (default %(default)s); a request's body "
                        "field n_draft overrides it")
    v.add_argument("--n-ctx", type=_positive_int, default=None,
                   help="total context, shared by the --n-seq sequences (default: 2048 per sequence)")
    v.add_argument("--cache-ram", type=_byte_size, default=None, metavar="BYTES",
                   help="host memory for the states of evicted conversations (e.g. 2G; 0: none; default 1G)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    v.add_argument("--api-key", default=None, help="ask clients for 'Authorization: Bearer KEY' "
                   "(default: the MTP_CY_API_KEY environment variable; none when unset)")
    v.add_argument("--model-alias", default=None, metavar="NAME", help="the model id clients see (default: the file's stem)")
    v.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 503 "
                   "(default %(default)s)")
    v.add_argument("--max-body-bytes", type=_byte_size, default=8 << 20, metavar="BYTES",
                   help="largest request body (default 8M)")
    v.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take, its wait for a "
                   "slot included (default %(default)s)")
    v.add_argument("--shutdown-timeout", type=float, default=10.0, help="on SIGTERM/SIGINT, seconds that requests "
                   "in flight may take to finish before they are cancelled (default %(default)s)")
    v.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: every CPU this process may use)")
    v.add_argument("--n-gpu-layers", type=int, default=None, help="layers to offload (-1 = all, default)")
    v.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    v.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="plain vs MTP decoding speed on a GGUF model")
    b.add_argument("model")
    b.add_argument("--prompt", default="The quick brown fox")
    b.add_argument("--max-tokens", type=_positive_int, default=128)
    b.add_argument("--n-draft", default="1,2,3,4,auto",
                   help="comma-separated draft lengths, 'auto' included (default %(default)s)")
    b.add_argument("--mtp-head", default=None, metavar="GGUF", help="an MTP sidecar for a model without MTP layers")
    b.add_argument("--repeats", type=_positive_int, default=3)
    b.add_argument("--n-gpu-layers", type=int, default=None)
    common(b)
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, CPU features and devices")
    i.add_argument("--rpc", default=None, metavar="SERVERS", help="also list the devices of these RPC servers")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("rpc-server", help="serve this machine's devices to other hosts (llama.cpp RPC server)",
                       description="Run llama.cpp's RPC server (the one of upstream's rpc-server program) so that "
                                   "other machines can place model layers on this machine's devices "
                                   "(Model(path, rpc_servers=['HOST:PORT']) or --rpc HOST:PORT). The protocol has "
                                   "no authentication: it listens on loopback unless --host says otherwise.")
    s.add_argument("--host", default="127.0.0.1", help="IPv4 address to listen on (default %(default)s: this "
                   "machine only; another address exposes an unauthenticated service)")
    s.add_argument("--port", type=int, default=50052, help="TCP port (default %(default)s)")
    s.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: half the cores)")
    s.add_argument("--cache", default=None, metavar="DIR",
                   help="cache large tensors received in DIR, so that reloading a model skips sending them")
    s.add_argument("--device", default=None, metavar="DEVS",
                   help="comma-separated device names to serve (default: the GPUs, or the CPU when there is none)")
    s.set_defaults(func=cmd_rpc_server)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import mtp_cy
    try:
        return args.func(args)
    except (mtp_cy.MTPError, ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
