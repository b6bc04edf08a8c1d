"""Foundation: package API, model loading, tokens, logging, errors."""
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mtp_cy
from conftest import prompt_of


def test_version_and_commit():
    assert mtp_cy.__version__.count(".") >= 2
    assert mtp_cy.llama_cpp_commit == "0c1e57098"


def test_init_is_idempotent_and_system_info():
    mtp_cy.init()
    mtp_cy.init()
    info = mtp_cy.system_info()
    assert "CPU" in info


def test_build_info_names_the_loaded_cpu_backend():
    from pathlib import Path
    info = mtp_cy.build_info()
    assert set(info) == {"backend_dl", "backends", "cpu_variant"}
    assert info["backends"].get("CPU")
    if info["backend_dl"]:
        # portable build (wheels): the CPU module picked for this CPU, from the package dir
        cpu = Path(info["backends"]["CPU"])
        assert cpu.parent == Path(mtp_cy.__file__).resolve().parent
        assert cpu.name.startswith("libggml-cpu") and info["cpu_variant"]
        assert f"CPU variant = {info['cpu_variant']}" in mtp_cy.system_info()
    else:
        # static developer build: the backend lives in _core itself
        assert info["cpu_variant"] is None
        assert Path(info["backends"]["CPU"]).name.startswith("_core")


def test_devices_lists_the_cpu():
    devs = mtp_cy.devices()
    assert any(d["type"] == "cpu" for d in devs)
    for d in devs:
        assert set(d) >= {"name", "description", "type", "backend", "memory_free", "memory_total"}
        assert isinstance(d["memory_total"], int)


def test_import_and_load_print_nothing(plain_sm):
    code = textwrap.dedent(f"""
        import mtp_cy
        m = mtp_cy.Model({str(plain_sm.path)!r})
        s = mtp_cy.Session(m, n_ctx=128)
        s.generate([{plain_sm.token_ids[0]}, {plain_sm.token_ids[1]}], max_tokens=3, temp=0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


def test_log_bridge_routes_llama_logs(plain_sm, caplog):
    with caplog.at_level(logging.DEBUG, logger="mtp_cy"):
        mtp_cy.Model(plain_sm.path).close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "mtp_cy"]
    assert any("qwen35" in m for m in msgs), msgs[:10]
    assert all("\n" not in m for m in msgs)


def test_model_properties(plain_model, mtp_model, plain_sm):
    m = plain_model
    assert m.arch == "qwen35"
    assert m.n_vocab > 50000
    assert m.n_embd > 0 and m.n_layer > 0 and m.n_params > 0 and m.size_bytes > 0
    assert m.n_ctx_train > 0
    assert m.has_mtp is False and m.n_layer_nextn == 0
    assert mtp_model.has_mtp is True and mtp_model.n_layer_nextn == 1
    md = m.metadata
    assert md["general.architecture"] == "qwen35"
    assert isinstance(m.description, str) and m.description
    assert m.eos_token_id is not None and m.is_eog(m.eos_token_id)
    assert m.path == str(plain_sm.path)
    assert "qwen35" in repr(m)


def test_load_mtp_false_leaves_head_out(mtp_sm):
    with mtp_cy.Model(mtp_sm.path, load_mtp=False) as m:
        assert m.n_layer_nextn == 1 and m.has_mtp is False


def test_tokenize_roundtrip(plain_model, plain_sm):
    text = "".join(plain_sm.words[:5])
    toks = plain_model.tokenize(text, add_special=False)
    assert isinstance(toks, np.ndarray) and toks.dtype == np.int32
    assert list(toks) == plain_sm.token_ids[:5]
    assert plain_model.detokenize(toks) == text
    assert plain_model.token_to_piece(int(toks[0])) == plain_sm.words[0].encode()
    assert plain_model.tokenize(b"hello", add_special=False).size > 0
    with pytest.raises(TypeError):
        plain_model.tokenize(12)
    with pytest.raises(ValueError):
        plain_model.token_to_piece(-1)
    with pytest.raises(ValueError):
        plain_model.detokenize([plain_model.n_vocab])


def test_progress_callback_and_cancel(plain_sm, capsys):
    seen = []
    mtp_cy.Model(plain_sm.path, progress=lambda p: seen.append(p)).close()
    assert seen and all(0.0 <= p <= 1.0 for p in seen) and seen[-1] == 1.0
    with pytest.raises(mtp_cy.ModelLoadError, match="cancel"):
        mtp_cy.Model(plain_sm.path, progress=lambda p: False)

    def boom(p):
        raise KeyError("stop")
    with pytest.raises(mtp_cy.ModelLoadError) as ei:
        mtp_cy.Model(plain_sm.path, progress=boom)
    assert isinstance(ei.value.__cause__, KeyError)
    mtp_cy.Model(plain_sm.path, progress=True).close()
    assert "100%" in capsys.readouterr().err


# -- bad input: a clear exception, never a crash --------------------------------------

def test_load_errors(tmp_path, plain_sm):
    with pytest.raises(mtp_cy.ModelLoadError, match="not found"):
        mtp_cy.Model(tmp_path / "missing.gguf")
    with pytest.raises(mtp_cy.ModelLoadError, match="directory"):
        mtp_cy.Model(tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(mtp_cy.ModelLoadError, match="empty"):
        mtp_cy.Model(empty)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, this is not a model\n")
    with pytest.raises(mtp_cy.ModelLoadError, match="not a GGUF"):
        mtp_cy.Model(txt)
    data = open(plain_sm.path, "rb").read()
    for cut in (24, 4096, len(data) // 2):
        trunc = tmp_path / f"trunc{cut}.gguf"
        trunc.write_bytes(data[:cut])
        with pytest.raises(mtp_cy.ModelLoadError):
            mtp_cy.Model(trunc)


def test_unknown_architecture(tmp_path):
    import gguf
    p = tmp_path / "alien.gguf"
    w = gguf.GGUFWriter(str(p), "alienarch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(mtp_cy.ModelLoadError, match="alienarch|unknown"):
        mtp_cy.Model(p)


def test_model_argument_errors(plain_sm):
    with pytest.raises(ValueError, match="split_mode"):
        mtp_cy.Model(plain_sm.path, split_mode="diagonal")
    with pytest.raises(TypeError, match="n_gpu_layers"):
        mtp_cy.Model(plain_sm.path, n_gpu_layers="all")
    with pytest.raises(ValueError, match="tensor_split"):
        mtp_cy.Model(plain_sm.path, tensor_split=[1.0] * 1000)
    with pytest.raises(TypeError, match="progress"):
        mtp_cy.Model(plain_sm.path, progress=3)


def test_session_argument_errors(plain_model, plain_sm):
    with pytest.raises(ValueError, match="n_ctx"):
        mtp_cy.Session(plain_model, n_ctx=0)
    with pytest.raises(ValueError, match="n_ctx"):
        mtp_cy.Session(plain_model, n_ctx=-5)
    with pytest.raises(ValueError, match="type_k"):
        mtp_cy.Session(plain_model, type_k="q9_9")
    with pytest.raises(ValueError, match="flash_attn"):
        mtp_cy.Session(plain_model, flash_attn="sometimes")
    with pytest.raises(ValueError, match="quantized V cache"):
        mtp_cy.Session(plain_model, type_v="q8_0", flash_attn=False)
    with pytest.raises(TypeError, match="n_ctxx"):
        mtp_cy.Session(plain_model, n_ctxx=5)
    s = mtp_cy.Session(plain_model, n_ctx=64)
    p = prompt_of(plain_sm, 3)
    with pytest.raises(ValueError, match="max_tokens"):
        s.generate(p, max_tokens=0)
    with pytest.raises(ValueError, match=r"100 tokens.*n_ctx is 64"):
        s.generate(plain_sm.token_ids[:1] * 100)
    with pytest.raises(ValueError, match="empty"):
        s.generate([])
    with pytest.raises(ValueError, match="empty"):
        s.generate("")  # no BOS in this vocab: nothing to start from
    with pytest.raises(ValueError, match="grammar"):
        s.generate(p, grammar="root ::= (((")
    with pytest.raises(ValueError, match="grammar_root"):
        s.generate(p, grammar='root ::= "a"', grammar_root="start")
    with pytest.raises(TypeError, match="temperature"):
        s.generate(p, temperature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        s.generate(p, top_p=0.0)
    with pytest.raises(TypeError, match="temp"):
        s.generate(p, temp="hot")
    with pytest.raises(ValueError, match="token id"):
        s.generate([plain_model.n_vocab + 1])
    with pytest.raises(TypeError, match="prompt"):
        s.generate(3.5)
    # after every failure the session is still usable
    assert s.generate(p, max_tokens=4, temp=0) == "".join(plain_sm.words[i] for i in
                                                         _greedy_idx(plain_sm, p, 4))
    s.close()


def _greedy_idx(sm, prompt, n):
    ids = sm.greedy(prompt, n).tokens
    return [sm.token_ids.index(t) for t in ids]


def test_closed_objects_raise(plain_sm):
    m = mtp_cy.Model(plain_sm.path)
    s = mtp_cy.Session(m, n_ctx=64)
    m.close()
    m.close()  # idempotent
    with pytest.raises(mtp_cy.ClosedError):
        m.tokenize("x")
    with pytest.raises(mtp_cy.ClosedError):
        mtp_cy.Session(m)
    # the session keeps the weights alive
    assert s.generate(prompt_of(plain_sm, 2), max_tokens=2, temp=0)
    s.close()
    s.close()
    with pytest.raises(mtp_cy.ClosedError):
        s.generate(prompt_of(plain_sm, 2))
    with mtp_cy.Model(plain_sm.path) as m2:
        with mtp_cy.Session(m2, n_ctx=32) as s2:
            assert not s2.closed
        assert s2.closed
    assert m2.closed


def test_fetch_is_cached_and_verified(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    if not (root / "vendor" / "fetch_llama_cpp.py").is_file():
        pytest.skip("not a source checkout (testing an installed wheel)")
    spec = importlib.util.spec_from_file_location("fetch", root / "vendor" / "fetch_llama_cpp.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    cached = fetch.cache_dir() / fetch.SDIST_FILE
    if not cached.exists():
        pytest.skip("no cached sdist")

    def no_network(*a, **k):
        raise AssertionError("network used although the sdist is cached")
    monkeypatch.setattr(fetch, "_download_url", no_network)
    monkeypatch.setattr(fetch, "_download_pip", no_network)
    assert fetch.fetch_sdist() == cached
    # a corrupted cache is refused (and downloading is attempted again)
    monkeypatch.setenv("MTP_CY_CACHE_DIR", str(tmp_path))
    (tmp_path / fetch.SDIST_FILE).write_bytes(b"corrupt")

    def bad_download(dest):
        dest.write_bytes(b"still corrupt")
    monkeypatch.setattr(fetch, "_download_url", bad_download)
    with pytest.raises(SystemExit, match="sha256"):
        fetch.fetch_sdist()
    assert fetch._keep("ggml/src/ggml.c") and fetch._keep("models/ggml-vocab-gpt-2.gguf")
    assert not fetch._keep("docs/build.md") and not fetch._keep("models/ggml-vocab-gpt-2.gguf.inp")
