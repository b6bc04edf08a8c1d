"""Shared fixtures: synthetic models (generated once, cached) and helpers."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    import mtp_cy
    return [f"mtp_cy {mtp_cy.__version__} from {Path(mtp_cy.__file__).parent}",
            f"llama.cpp {mtp_cy.llama_cpp_commit}; {mtp_cy.system_info()}"]


@pytest.fixture(scope="session")
def synthetic():
    from mtp_cy import synthetic
    return synthetic


@pytest.fixture(scope="session")
def plain_sm(synthetic):
    """A tiny qwen35 model without MTP head."""
    return synthetic.cached_model(mtp=False)


@pytest.fixture(scope="session")
def mtp_sm(synthetic):
    """A tiny qwen35 model with an MTP head drafting right 75% of the time."""
    return synthetic.cached_model(mtp=True, acceptance=0.75)


@pytest.fixture(scope="session")
def plain_model(plain_sm):
    import mtp_cy
    m = mtp_cy.Model(plain_sm.path)
    yield m
    m.close()


@pytest.fixture(scope="session")
def mtp_model(mtp_sm):
    import mtp_cy
    m = mtp_cy.Model(mtp_sm.path)
    yield m
    m.close()


def make_engine(kind, model, n_draft=3, **kw):
    """A ``Session`` (``kind="session"``), an ``MTP`` drafting ``n_draft`` (``kind="mtp"``) or a
    one-slot ``Batch`` drafting ``n_draft`` (``kind="batch"``) on ``model`` with the context
    options ``kw``."""
    import mtp_cy
    if kind == "mtp":
        return mtp_cy.MTP(model, n_draft=n_draft, **kw)
    if kind == "batch":
        return mtp_cy.Batch(model, n_seq=1, n_draft=n_draft, **kw)
    return mtp_cy.Session(model, **kw)


@pytest.fixture(scope="module", params=["session", "mtp"])
def engine(request, mtp_model):
    """``(kind, engine)``: a Session and an MTP (n_draft 3) on the MTP model, n_ctx 256, one
    thread, one of each per module (modules with other needs define their own)."""
    e = make_engine(request.param, mtp_model, n_ctx=256, n_threads=1)
    yield request.param, e
    e.close()


#: the exact counters of a call (the oracle predicts them)
COUNTERS = ("iters", "drafts_generated", "drafts_accepted", "tokens_emitted")


def counters(st):
    """The exact counters of a statistics dict (``stats()``, ``Completion.stats``)."""
    return {k: st[k] for k in COUNTERS}


def expected(pred):
    """The same counters as the synthetic oracle predicts them (``SyntheticModel.predict``)."""
    return {"iters": pred.iters, "drafts_generated": pred.drafts_generated,
            "drafts_accepted": pred.drafts_accepted, "tokens_emitted": pred.tokens_emitted}


def prompt_of(sm, n=3, start=0):
    """A prompt of n words of the synthetic model's word set."""
    return [sm.token_ids[(start + i) % len(sm.token_ids)] for i in range(n)]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------- upstream programs
_UPSTREAM = {}


def upstream_bin_dir():
    """Where upstream's reference programs are (or get built)."""
    d = os.environ.get("MTP_CY_UPSTREAM_BIN")
    if d:
        return Path(d)
    return Path(os.environ.get("MTP_CY_BUILD_DIR", ROOT / "build" / "native")) / "bin"


def upstream_binary(name):
    """Path of upstream's ``name`` program, built on first use from the vendored source
    (``vendor/native_build.upstream_program``), or None (no build tree, e.g. testing an
    installed wheel, and ``$MTP_CY_UPSTREAM_BIN`` unset)."""
    import importlib.util
    if name not in _UPSTREAM:
        path = None
        if os.environ.get("MTP_CY_UPSTREAM_BIN"):
            path = upstream_bin_dir() / name
            path = path if path.is_file() else None
        elif (ROOT / "vendor" / "native_build.py").is_file():
            spec = importlib.util.spec_from_file_location("native_build", ROOT / "vendor" / "native_build.py")
            nb = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(nb)
            path = nb.upstream_program(name, ROOT)
        _UPSTREAM[name] = path
    return _UPSTREAM[name]


def check_interrupt_stops_prefill(engine, long_prompt):
    """Ctrl-C (``_thread.interrupt_main``) 10% into a long prefill on ``engine`` raises
    KeyboardInterrupt well before the prefill would have finished."""
    import _thread
    import threading
    import time
    engine.clear_cache()          # the prompt cache would skip the second prefill
    t0 = time.perf_counter()
    engine.generate(long_prompt, max_tokens=1, temp=0)
    full = time.perf_counter() - t0
    engine.clear_cache()
    timer = threading.Timer(full * 0.1, _thread.interrupt_main)
    timer.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.generate(long_prompt, max_tokens=1, temp=0)
    finally:
        timer.cancel()
        timer.join()
    took = time.perf_counter() - t0
    assert took < full * 0.8, (took, full)
