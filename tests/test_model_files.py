"""Files llama.cpp loads but cannot run are refused with ModelLoadError before the first decode.

Two families abort the interpreter inside llama.cpp otherwise: a hybrid model whose layer pattern
leaves one of its memories without a layer (GGML_ASSERT in the hybrid memory's input setup), and
an MTP-head-only file (a sidecar) opened as the model (segfault).  Each variant is loaded and, if
mtp_cy accepted it, decoded in a child process, so that a regression fails the test instead of
killing the test run.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys
    import mtp_cy
    out = []
    for path, kw in json.loads(sys.argv[1]):
        try:
            m = mtp_cy.Model(path, **kw)
        except mtp_cy.ModelLoadError as exc:
            out.append(["ModelLoadError", str(exc)])
            continue
        try:
            with m, mtp_cy.Session(m, n_ctx=128, n_threads=1) as s:
                out.append(["ok", s.generate([1, 2, 3], max_tokens=3, temp=0)])
        except Exception as exc:
            out.append([type(exc).__name__, str(exc)])
    print(json.dumps(out))
""")


def run_child(cases, timeout=120):
    """Load (and decode) each ``(path, Model kwargs)`` in one child process; its outcomes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps([[str(p), kw] for p, kw in cases])],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, f"the child died (rc {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def degenerate(synthetic, monkeypatch, path, **kw):
    """A synthetic model with a layer pattern make_model refuses (it validates the interval)."""
    monkeypatch.setattr(synthetic, "_ALLOW_DEGENERATE_PATTERN", True)
    return synthetic.make_model(path, **kw)


# (n_trunk, full_attention_interval, arch, mtp): every layer attention (interval 1) or every
# layer recurrent (interval > n_trunk), dense and MoE, with and without an MTP block
PATTERNS = [
    (2, 1, "qwen35", False, "recurrent"),
    (4, 1, "qwen35", True, "recurrent"),
    (3, 4, "qwen35", True, "attention"),
    (4, 9, "qwen35", False, "attention"),
    (4, 1, "qwen35moe", True, "recurrent"),
    (2, 3, "qwen35moe", False, "attention"),
]


def test_hybrid_model_with_an_empty_memory_is_refused(synthetic, monkeypatch, tmp_path):
    cases = []
    for i, (n_trunk, interval, arch, mtp, lack) in enumerate(PATTERNS):
        sm = degenerate(synthetic, monkeypatch, tmp_path / f"degenerate-{i}.gguf", n_trunk=n_trunk,
                        full_attention_interval=interval, arch=arch, mtp=mtp)
        cases.append((sm.path, {}))
    # a file of the same kind with a valid pattern runs (the check refuses only what cannot run)
    good = synthetic.cached_model(mtp=True, arch="qwen35moe")
    cases.append((good.path, {}))
    got = run_child(cases)
    for (n_trunk, interval, arch, mtp, lack), (kind, msg) in zip(PATTERNS, got):
        assert kind == "ModelLoadError", (n_trunk, interval, arch, kind, msg)
        assert f"no {lack} layer" in msg and "hybrid" in msg and repr(arch) in msg, msg
        assert "full_attention_interval" in msg
    assert got[-1][0] == "ok"


def test_sidecar_opened_as_the_model_is_refused(synthetic, tmp_path):
    dense = synthetic.cached_model(mtp=True, layout="sidecar")
    moe = synthetic.cached_model(mtp=True, layout="sidecar", arch="qwen35moe")
    cases = [(dense.mtp_path, {}), (moe.mtp_path, {}), (dense.mtp_path, {"load_mtp": False}),
             (dense.mtp_path, {"n_gpu_layers": 0}),
             # the pair as it should be used works
             (dense.path, {"mtp_head": str(dense.mtp_path)})]
    got = run_child(cases)
    for (path, kw), (kind, msg) in zip(cases[:4], got[:4]):
        assert kind == "ModelLoadError", (kw, kind, msg)
        assert "holds only an MTP head" in msg and "mtp_head=" in msg and str(path) in msg
    assert got[4][0] == "ok"


def test_sidecar_as_vocabulary_only_is_fine(synthetic):
    """A tokenizer-only load of a sidecar runs nothing, so it is allowed."""
    import mtp_cy
    sm = synthetic.cached_model(mtp=True, layout="sidecar")
    with mtp_cy.Model(sm.mtp_path, vocab_only=True) as m:
        assert len(m.tokenize("the sea", add_special=False)) > 0


def test_refusal_leaves_nothing_behind(synthetic):
    """The sidecar check reads the GGUF header only: nothing is loaded, nothing leaks."""
    import mtp_cy
    from conftest import rss_bytes
    sm = synthetic.cached_model(mtp=True, layout="sidecar")
    for _ in range(3):
        with pytest.raises(mtp_cy.ModelLoadError):
            mtp_cy.Model(sm.mtp_path)
    rss0 = rss_bytes()
    for _ in range(50):
        with pytest.raises(mtp_cy.ModelLoadError, match="holds only an MTP head"):
            mtp_cy.Model(sm.mtp_path)
    assert rss_bytes() - rss0 < 8 << 20
