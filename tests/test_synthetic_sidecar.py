"""mtp_cy.synthetic layout="sidecar": a trunk-only GGUF plus an MTP-only ``mtp-<name>`` GGUF
with the weights of the combined file; upstream's ``-md`` loads the sidecar; mismatched
sidecars for negative tests."""
import numpy as np
import pytest

from mtp_cy import synthetic as syn

from synth_upstream import (SPEC, _private_cache, check_upstream, gguf_kv, gguf_tensors,  # noqa: F401
                            need, run_spec)


@pytest.mark.parametrize("arch, head", [("qwen35", "own"), ("qwen35", "shared"), ("qwen35moe", "shared")])
def test_sidecar_files_hold_the_combined_weights(tmp_path, arch, head):
    kw = dict(arch=arch, mtp_head=head, acceptance=0.5, n_trunk=5, full_attention_interval=2, seed=2,
              eog_after="sky", draft_confidence=0.6)
    c = syn.make_model(tmp_path / "c.gguf", **kw)
    s = syn.make_model(tmp_path / "s" / "t.gguf", layout="sidecar", **kw)
    assert (s.path, s.mtp_path) == (tmp_path / "s" / "t.gguf", tmp_path / "s" / "mtp-t.gguf")
    assert s.files == [s.path, s.mtp_path] and c.files == [c.path] and c.mtp_path is None
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["mtp-t.gguf", "t.gguf"]
    tc, tt, tm = gguf_tensors(c.path), gguf_tensors(s.path), gguf_tensors(s.mtp_path)
    mtp_blk = "blk.5."
    shared = {"token_embd.weight", "output_norm.weight", "output.weight"}
    assert set(tt) == {n for n in tc if not n.startswith(mtp_blk)}
    assert set(tm) == {n for n in tc if n.startswith(mtp_blk)} | shared
    assert "blk.0.attn_norm.weight" not in tm          # upstream's "mtp_only" test
    for part in (tt, tm):
        for n, a in part.items():
            assert np.array_equal(a, tc[n]), n
    kc, kt, km = gguf_kv(c.path), gguf_kv(s.path), gguf_kv(s.mtp_path)
    assert (kt[f"{arch}.block_count"], kt.get(f"{arch}.nextn_predict_layers")) == (5, None)
    assert (km[f"{arch}.block_count"], km[f"{arch}.nextn_predict_layers"]) == (6, 1)
    assert len(kt[f"{arch}.attention.recurrent_layers"]) == 5
    assert km[f"{arch}.attention.recurrent_layers"] == kc[f"{arch}.attention.recurrent_layers"]
    assert (kt["mtp_cy.synthetic.file"], km["mtp_cy.synthetic.file"]) == ("trunk", "mtp")
    # the rest of the metadata is the combined file's
    skip = {f"{arch}.block_count", f"{arch}.nextn_predict_layers", f"{arch}.attention.recurrent_layers",
            "mtp_cy.synthetic.file", "mtp_cy.synthetic.config", "GGUF.tensor_count", "GGUF.kv_count"}
    for k in kc:
        if k not in skip:
            assert kt[k] == kc[k] == km[k], k
    # the oracle: either file gives the pair; same maps and probabilities as the combined file
    for p in (s.path, s.mtp_path):
        r = syn.load_oracle(p)
        assert (r.path, r.mtp_path, r.layout) == (s.path, s.mtp_path, "sidecar")
        assert (r.f, r.g, r.draft_p) == (c.f, c.g, c.draft_p)
    assert s.n_params == c.n_params


def test_cached_sidecar(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_CY_CACHE_DIR", str(tmp_path / "cache"))
    a = syn.cached_model(layout="sidecar", acceptance=0.5)
    assert a.path.parent == tmp_path / "cache" and a.mtp_path == a.path.with_name("mtp-" + a.path.name)
    assert a.mtp_path.is_file()
    combined = syn.cached_model(acceptance=0.5)
    assert combined.path != a.path and combined.mtp_path is None
    mtime = a.mtp_path.stat().st_mtime_ns
    assert syn.cached_model(layout="sidecar", acceptance=0.5).mtp_path.stat().st_mtime_ns == mtime
    a.mtp_path.unlink()                                   # a lost sidecar: both files regenerated
    b = syn.cached_model(layout="sidecar", acceptance=0.5)
    assert b.mtp_path.is_file() and b.g == a.g


def test_sidecar_validation(tmp_path):
    with pytest.raises(ValueError, match="sidecar"):
        syn.make_model(tmp_path / "m.gguf", mtp=False, layout="sidecar")
    m = syn.make_model(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="kind"):
        syn.mismatched_sidecar(m, "bogus")
    with pytest.raises(ValueError, match="no MTP"):
        syn.mismatched_sidecar(syn.make_model(tmp_path / "p.gguf", mtp=False), "arch")


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_mismatched_sidecars(tmp_path, arch):
    m = syn.make_model(tmp_path / "t.gguf", arch=arch, layout="sidecar")
    good = gguf_kv(m.mtp_path)
    other = "qwen35moe" if arch == "qwen35" else "qwen35"
    files = {k: syn.mismatched_sidecar(m, k) for k in syn.MISMATCH_KINDS}
    assert files["arch"] == tmp_path / "mtp-arch-t.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["t.gguf", "mtp-t.gguf"] + [f"mtp-{k}-t.gguf" for k in syn.MISMATCH_KINDS])
    kv = {k: gguf_kv(p) for k, p in files.items()}
    t = {k: gguf_tensors(p) for k, p in files.items()}
    assert kv["arch"]["general.architecture"] == other
    assert kv["arch"][f"{other}.nextn_predict_layers"] == 1
    assert kv["n_embd"][f"{arch}.embedding_length"] == good[f"{arch}.embedding_length"] + 32
    assert t["n_vocab"]["token_embd.weight"].shape[0] == 151936 != m.n_vocab
    assert kv["no_nextn"][f"{arch}.block_count"] == m.n_trunk
    assert f"{arch}.nextn_predict_layers" not in kv["no_nextn"]
    assert not any(n.startswith("blk.") for n in t["no_nextn"])
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= set(t["no_nextn"])
    for k in ("arch", "n_embd", "n_vocab"):
        assert any(n.startswith(f"blk.{m.n_trunk}.nextn.") for n in t[k]) and "blk.0.attn_norm.weight" not in t[k]


# ---------------------------------------------------------------- upstream

@pytest.mark.parametrize("cfg", [dict(acceptance=0.5, mtp_head="own"),
                                 pytest.param(dict(arch="qwen35moe", acceptance=0.75, mtp_head="shared"),
                                              marks=pytest.mark.slow)],
                         ids=["dense-own", "moe-shared"])
def test_upstream_sidecar_equals_combined(cfg):
    """speculative-simple -m trunk.gguf -md mtp-trunk.gguf --spec-type draft-mtp: the oracle's
    text and counters, the same as the combined file's."""
    need(SPEC)
    s = syn.cached_model(layout="sidecar", **cfg)
    c = syn.cached_model(**cfg)
    for words, n_draft in (("the sea", 1), ("moon star tree", 3)):
        prompt = s.encode(words)
        want = check_upstream(s, prompt, n_draft, 24, md=s.mtp_path)
        assert check_upstream(c, prompt, n_draft, 24) == want
    # the trunk alone has no MTP layers: upstream refuses draft-mtp without the sidecar
    rc, _, counters, err = run_spec(s, s.encode("the sea"), 3, 12)
    assert rc != 0 and not counters and "doesn't contain MTP layers" in err


@pytest.mark.slow
def test_upstream_mismatched_sidecars():
    """What upstream does with each mismatched sidecar (pinned commit): it checks only the
    hidden width; another arch of the same shape even works (the sidecar is a model of its
    own), another vocabulary drafts other tokens (nothing accepted, output still lossless),
    and a file without a NextN block fails to load."""
    need(SPEC)
    m = syn.cached_model(layout="sidecar", acceptance=0.75)
    prompt = m.encode("the sea")
    res = {k: run_spec(m, prompt, 3, 24, md=syn.mismatched_sidecar(m, k)) for k in syn.MISMATCH_KINDS}
    want = m.predict(prompt, 24, 3, rules="upstream", n_ctx=512)
    rc, gen, counters, _ = res["arch"]
    assert (rc, gen, counters) == (0, want.text, dict(n_predict=want.n_predict, n_drafted=want.n_drafted,
                                                      n_accept=want.n_accept))
    rc, _, counters, err = res["n_embd"]
    assert rc != 0 and not counters and "MTP input row width must match" in err
    rc, gen, counters, _ = res["n_vocab"]
    assert rc == 0 and counters["n_accept"] == 0 and counters["n_drafted"] > 0
    assert gen == m.greedy(prompt, counters["n_predict"]).text
    rc, _, counters, err = res["no_nextn"]
    assert rc != 0 and not counters and "failed to load draft model" in err
