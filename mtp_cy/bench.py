"""Side-by-side throughput measurement of plain decoding and MTP speculative decoding.

Used by ``python -m mtp_cy bench MODEL.gguf`` and by ``benchmarks/bench_mtp.py``
(which adds upstream llama.cpp's native programs to the same table).

What is measured, per configuration (``plain`` = :class:`mtp_cy.Session`,
``mtp-k`` = :class:`mtp_cy.MTP` with ``n_draft=k``, ``mtp-auto`` with
``n_draft="auto"``, ``mtp-k-p0.8`` with ``p_min=0.8``; any other set through
``configs``):

* ``decode_tok_s``: tokens delivered to Python divided by the *wall-clock*
  decode time seen from Python (the whole stream minus the native prompt
  processing time), so every cost of the Python side is included, exactly as
  upstream's ``decoded N tokens in T seconds`` includes its whole loop;
* ``native_tok_s``: the same tokens over the native decode-loop time only
  (``stats()["timing_us"]["total"]``);
* ``py_us_per_token``: the difference, in microseconds per token: what the
  generator protocol and the Python-side bookkeeping cost;
* ``acceptance``, ``iters``, ``drafts_generated``, ``drafts_accepted`` of the runs.

Configurations are interleaved, in alternating order (``plain, mtp-1, ..., mtp-k``, then
``mtp-k, ..., mtp-1, plain``, ...), so that drifting machine load affects all of them alike
and the order of the runs cannot favour one; the median run is kept.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

__all__ = ["BenchRow", "measure", "default_configs", "format_table"]


@dataclass
class BenchRow:
    """One configuration's result (medians over the repeats)."""

    name: str
    n_draft: Union[int, str]
    tokens: int
    decode_tok_s: float
    native_tok_s: float
    py_us_per_token: float
    acceptance: float
    iters: int
    drafts_generated: int
    drafts_accepted: int
    prefill_ms: float
    runs: List[float] = field(default_factory=list)   # decode_tok_s of every repeat
    text: str = ""
    policy: Optional[dict] = None                      # n_draft="auto": stats()["policy"] after the runs


def _one_run(engine, prompt, max_tokens: int, sampling: dict):
    engine.reset_stats()
    engine.clear_cache()          # every run processes its prompt (the cache would skip it)
    t0 = time.perf_counter()
    n = 0
    parts = []
    for piece in engine.stream(prompt, max_tokens=max_tokens, **sampling):
        parts.append(piece)
        n += 1
    wall = time.perf_counter() - t0
    st = engine.stats()
    t = st["timing_us"]
    decode_s = max(wall - t.get("prefill", 0) / 1e6, 1e-9)
    native_s = max(t["total"] / 1e6, 1e-9)
    tokens = st["tokens_emitted"]
    return dict(tokens=tokens, decode_tok_s=tokens / decode_s, native_tok_s=tokens / native_s,
                py_us=(decode_s - native_s) * 1e6 / max(tokens, 1), st=st, text="".join(parts),
                prefill_ms=t.get("prefill", 0) / 1e3)


def default_configs(n_drafts: Sequence[Union[int, str]] = (1, 2, 3, 4), plain: bool = True,
                    p_mins: Sequence[float] = ()) -> List[tuple]:
    """``(name, MTP options or None for plain decoding)`` for plain, each ``n_draft`` and,
    with ``p_mins``, ``n_draft=max(ints)`` with each ``p_min``."""
    out = [("plain", None)] if plain else []
    for k in n_drafts:
        out.append((f"mtp-{k}", {"n_draft": k}))
    ints = [k for k in n_drafts if k != "auto"]
    for p in p_mins:
        k = max(ints) if ints else 3
        out.append((f"mtp-{k}-p{p:g}", {"n_draft": k, "p_min": p}))
    return out


def measure(model, prompt: Union[str, Sequence[int]], *, max_tokens: int = 128,
            n_drafts: Sequence[Union[int, str]] = (1, 2, 3, 4), repeats: int = 3, plain: bool = True,
            n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
            sampling: Optional[dict] = None, progress=None, configs: Optional[Sequence[tuple]] = None,
            warmup: int = 8) -> List[BenchRow]:
    """Measure plain decoding and MTP for each configuration on ``model``; return one row each.

    ``configs`` is a list of ``(name, MTP options or None)`` (see :func:`default_configs`,
    the default from ``n_drafts``/``plain``).  ``sampling`` defaults to greedy
    (``temp=0``), which makes every run of a configuration produce the same tokens.
    ``progress`` is an optional callable receiving a short status string before each
    run.  ``warmup`` tokens are generated once per configuration first (weights paged
    in, graphs built, and ``n_draft="auto"`` past its first measurements).
    """
    import mtp_cy
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sampling = {"temp": 0.0} if sampling is None else dict(sampling)
    opts: Dict[str, object] = {}
    if n_threads is not None:
        opts["n_threads"] = n_threads
    n_prompt = len(model.tokenize(prompt)) if isinstance(prompt, str) else len(prompt)
    opts["n_ctx"] = n_ctx if n_ctx is not None else n_prompt + max_tokens + 16
    if configs is None:
        configs = default_configs(n_drafts, plain)
    engines = []
    for name, mtp_opts in configs:
        if mtp_opts is None:
            engines.append((name, 0, mtp_cy.Session(model, **opts)))
        else:
            engines.append((name, mtp_opts.get("n_draft", 3), mtp_cy.MTP(model, **mtp_opts, **opts)))
    results: Dict[str, list] = {name: [] for name, _, _ in engines}
    policies: Dict[str, dict] = {}
    try:
        for name, _, eng in engines:
            _one_run(eng, prompt, min(max_tokens, warmup), sampling)
        for r in range(repeats):
            # alternate the order (reversed on odd repeats): no engine always runs first or
            # always right after the same other one
            for name, _, eng in (engines if r % 2 == 0 else engines[::-1]):
                if progress is not None:
                    progress(f"run {r + 1}/{repeats}: {name}")
                results[name].append(_one_run(eng, prompt, max_tokens, sampling))
        for name, _, eng in engines:
            pol = eng.stats().get("policy")
            if pol is not None:
                policies[name] = pol
    finally:
        for _, _, eng in engines:
            eng.close()
    rows = []
    for name, k, _ in engines:
        runs = results[name]
        med = sorted(runs, key=lambda x: x["decode_tok_s"])[len(runs) // 2]
        st = med["st"]
        rows.append(BenchRow(
            name=name, n_draft=k, tokens=med["tokens"], decode_tok_s=med["decode_tok_s"],
            native_tok_s=statistics.median(x["native_tok_s"] for x in runs),
            py_us_per_token=statistics.median(x["py_us"] for x in runs),
            acceptance=st["acceptance_rate"], iters=st["iters"],
            drafts_generated=st["drafts_generated"], drafts_accepted=st["drafts_accepted"],
            prefill_ms=med["prefill_ms"], runs=[x["decode_tok_s"] for x in runs], text=med["text"],
            policy=policies.get(name)))
    return rows


def format_table(rows: Sequence[BenchRow], extra: Sequence[dict] = ()) -> str:
    """A plain-text table of ``rows`` (speed-up relative to the ``plain`` row when present).

    ``extra`` rows are dicts with ``name`` and ``decode_tok_s`` (and optionally
    ``acceptance``), e.g. upstream's native programs, shown in the same table.
    """
    base = next((r.decode_tok_s for r in rows if r.name == "plain"), None)
    head = f"{'config':<22}{'tok/s':>10}{'vs plain':>10}{'accept':>9}{'iters':>7}{'py us/tok':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = f"{r.decode_tok_s / base:.2f}x" if base else "-"
        acc = f"{r.acceptance * 100:.1f}%" if r.n_draft else "-"
        lines.append(f"{r.name:<22}{r.decode_tok_s:>10.1f}{sp:>10}{acc:>9}{r.iters:>7}{r.py_us_per_token:>11.1f}")
    for e in extra:
        sp = f"{e['decode_tok_s'] / base:.2f}x" if base else "-"
        acc = f"{e['acceptance'] * 100:.1f}%" if e.get("acceptance") is not None else "-"
        lines.append(f"{e['name']:<22}{e['decode_tok_s']:>10.1f}{sp:>10}{acc:>9}{'':>7}{'':>11}")
    return "\n".join(lines)
