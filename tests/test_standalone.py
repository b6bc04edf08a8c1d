"""The package works on its own (issue 11): no llama.cpp checkout, no ``MTP_CY_LLAMA_CPP_DIR``,
run from outside the source tree.

The synthetic models' vocabularies ship in the package (``mtp_cy/vocab/``, copied from the
llama.cpp source by setup.py's build).  tools/wheel_check.sh and cibuildwheel run the whole
test-suite that way against the installed wheel; these tests check it in any install.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mtp_cy
from mtp_cy import synthetic

PKG = Path(mtp_cy.__file__).resolve().parent
SHIPPED = ("gpt-2", "qwen35")


def alone_env(tmp_path):
    """A user's environment: no llama.cpp anywhere, a fresh model cache, the mtp_cy under test."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MTP_CY_LLAMA_CPP_DIR", "MTP_CY_BUILD_DIR", "MTP_CY_UPSTREAM_BIN")}
    env["MTP_CY_CACHE_DIR"] = str(tmp_path / "cache")
    # the package this test-suite imports (an installed wheel, or the source tree of a
    # developer build), whatever the current directory
    env["PYTHONPATH"] = os.pathsep.join([str(PKG.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def elsewhere(tmp_path):
    d = tmp_path / "elsewhere"
    d.mkdir(exist_ok=True)
    return d


def test_vocabularies_are_shipped(monkeypatch):
    monkeypatch.delenv("MTP_CY_LLAMA_CPP_DIR", raising=False)
    for v in SHIPPED:
        p = PKG / "vocab" / f"ggml-vocab-{v}.gguf"
        assert p.is_file() and p.stat().st_size > 1_000_000, p
        assert synthetic.find_vocab(v) == p
    # llama.cpp's MIT license travels with its files
    assert "MIT License" in (PKG / "vocab" / "LICENSE.llama.cpp").read_text()


def test_missing_vocabulary_lists_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("MTP_CY_LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(ValueError) as e:
        synthetic.find_vocab("no-such-vocab")
    msg = str(e.value)
    assert str(PKG / "vocab" / "ggml-vocab-no-such-vocab.gguf") in msg
    assert str(tmp_path / "models" / "ggml-vocab-no-such-vocab.gguf") in msg


def test_installed_files_list_the_vocabularies():
    """An installed wheel's RECORD holds the vocabularies (so the wheel did)."""
    from importlib import metadata
    for dist in metadata.distributions():
        if not dist.read_text("RECORD"):  # e.g. a source tree's mtp_cy.egg-info
            continue
        files = {str(f): f for f in dist.files or []}
        init = files.get("mtp_cy/__init__.py")
        if init is not None and Path(init.locate()).resolve() == PKG / "__init__.py":
            break
    else:
        pytest.skip("mtp_cy is not installed from a wheel (editable install or source tree)")
    for name in [f"ggml-vocab-{v}.gguf" for v in SHIPPED] + ["LICENSE.llama.cpp"]:
        assert f"mtp_cy/vocab/{name}" in files, name
        assert Path(files[f"mtp_cy/vocab/{name}"].locate()).resolve() == PKG / "vocab" / name


def test_make_model_alone(tmp_path):
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "import mtp_cy\n"
        "from mtp_cy import synthetic\n"
        "out = {'pkg': mtp_cy.__file__}\n"
        "for v in ('gpt-2', 'qwen35'):\n"
        "    sm = synthetic.make_model(Path(sys.argv[1]) / f'{v}.gguf', vocab=v)\n"
        "    with mtp_cy.Model(sm.path) as m:\n"
        "        out[v] = [str(synthetic.find_vocab(v)), sm.n_vocab, m.n_vocab]\n"
        "print(json.dumps(out))\n")
    models = tmp_path / "models"
    models.mkdir()
    r = subprocess.run([sys.executable, "-c", script, str(models)], cwd=elsewhere(tmp_path),
                       env=alone_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert Path(out["pkg"]).resolve().parent == PKG
    for v in SHIPPED:
        vocab, n_vocab, loaded = out[v]
        assert Path(vocab).resolve() == PKG / "vocab" / f"ggml-vocab-{v}.gguf"
        assert n_vocab == loaded > 50_000
        assert (models / f"{v}.gguf").is_file()


def test_demo_alone(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mtp_cy", "demo", "--quiet", "--max-tokens", "24", "--n-draft", "3"],
                       cwd=elsewhere(tmp_path), env=alone_env(tmp_path), capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"identical to plain greedy text +yes", r.stdout), r.stdout
    assert re.search(r"statistics equal the oracle +yes", r.stdout), r.stdout
    # the model was made now, from the shipped vocabulary, in the fresh cache
    assert list((tmp_path / "cache").glob("synthetic-*.gguf"))
