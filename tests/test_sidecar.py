"""MTP heads from a separate GGUF (upstream's MTP-only "sidecar", ``mtp-<name>.gguf``):
``Model(trunk, mtp_head=sidecar)`` drafts exactly as the combined file does; a sidecar that
does not fit the model is refused with the reason, never an abort."""
import subprocess
import sys

import pytest

import mtp_cy
from conftest import prompt_of

COUNTERS = ("iters", "drafts_generated", "drafts_accepted", "tokens_emitted")


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTP_CY_CACHE_DIR", str(tmp_path_factory.mktemp("sidecar-cache")))
        yield


@pytest.mark.parametrize("arch, head", [("qwen35", "own"), ("qwen35", "shared"), ("qwen35moe", "shared")])
def test_sidecar_equals_the_combined_file(synthetic, arch, head):
    kw = dict(arch=arch, mtp_head=head, acceptance=0.75, seed=1)
    combined = synthetic.cached_model(**kw)
    split = synthetic.cached_model(layout="sidecar", **kw)
    with mtp_cy.Model(combined.path) as mc, mtp_cy.Model(split.path, mtp_head=split.mtp_path) as ms:
        assert (ms.has_mtp, ms.mtp_source, ms.mtp_head, ms.n_layer_nextn) == (True, "sidecar", str(split.mtp_path), 1)
        assert (mc.mtp_source, mc.mtp_head) == ("model", None)
        assert "+MTP(mtp-" in repr(ms)
        for nd in (1, 3, "auto"):
            with mtp_cy.MTP(mc, n_draft=nd) as a, mtp_cy.MTP(ms, n_draft=nd) as b:
                for n in (1, 4):
                    p = prompt_of(combined, n, start=2)
                    ca = a.complete(p, max_tokens=40, temp=0)
                    cb = b.complete(p, max_tokens=40, temp=0)
                    assert ca.text == cb.text == combined.greedy(p, 40).text
                    if nd != "auto":
                        want = combined.predict(p, 40, nd)
                        for c in (ca, cb):
                            assert {k: c.stats[k] for k in COUNTERS} == {
                                "iters": want.iters, "drafts_generated": want.drafts_generated,
                                "drafts_accepted": want.drafts_accepted, "tokens_emitted": want.tokens_emitted}


def test_trunk_alone_has_no_head(synthetic):
    split = synthetic.cached_model(layout="sidecar", acceptance=0.75)
    with mtp_cy.Model(split.path) as m:
        assert not m.has_mtp and m.mtp_source is None and m.n_layer_nextn == 0
        with pytest.raises(mtp_cy.MTPUnsupportedError, match="mtp_head="):
            mtp_cy.MTP(m)
        assert mtp_cy.Session(m).generate(prompt_of(split, 3), max_tokens=5, temp=0) == \
            split.greedy(prompt_of(split, 3), 5).text


@pytest.mark.parametrize("kind, match", [
    ("arch", r"it is a 'qwen35moe' model, the model is 'qwen35'"),
    ("n_embd", r"its width is 96, the model's is 64"),
    ("n_vocab", r"its vocabulary has \d+ tokens, the model's has 50257"),
    ("no_nextn", r"no MTP \(NextN\) layer"),
])
def test_sidecars_that_do_not_fit(synthetic, kind, match):
    split = synthetic.cached_model(layout="sidecar", acceptance=0.75)
    bad = synthetic.mismatched_sidecar(split, kind)
    with pytest.raises(mtp_cy.MTPUnsupportedError, match=match):
        mtp_cy.Model(split.path, mtp_head=bad)


def test_other_wrong_heads(synthetic, tmp_path):
    split = synthetic.cached_model(layout="sidecar", acceptance=0.75)
    plain = synthetic.cached_model(mtp=False)
    other_depth = synthetic.cached_model(layout="sidecar", acceptance=0.75, n_trunk=6, full_attention_interval=3)
    with pytest.raises(mtp_cy.MTPUnsupportedError, match="no MTP .NextN. layer.*a plain model"):
        mtp_cy.Model(split.path, mtp_head=plain.path)
    with pytest.raises(mtp_cy.MTPUnsupportedError, match="trunk of 6 layers, the model has 4"):
        mtp_cy.Model(split.path, mtp_head=other_depth.mtp_path)
    with pytest.raises(mtp_cy.ModelLoadError, match="not found"):
        mtp_cy.Model(split.path, mtp_head=tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(mtp_cy.ModelLoadError, match="not a GGUF"):
        mtp_cy.Model(split.path, mtp_head=junk)
    with pytest.raises(ValueError, match="vocab_only"):
        mtp_cy.Model(split.path, mtp_head=split.mtp_path, vocab_only=True)
    with pytest.raises(ValueError, match="load_mtp=False"):
        mtp_cy.Model(split.path, mtp_head=split.mtp_path, load_mtp=False)
    # a combined file as the head works (its NextN block is used)
    combined = synthetic.cached_model(acceptance=0.75)
    with mtp_cy.Model(split.path, mtp_head=combined.path) as m, mtp_cy.MTP(m) as x:
        assert x.generate(prompt_of(split, 3), max_tokens=10, temp=0) == split.greedy(prompt_of(split, 3), 10).text


def test_close_frees_both_files(synthetic):
    split = synthetic.cached_model(layout="sidecar", acceptance=0.75)
    m = mtp_cy.Model(split.path, mtp_head=split.mtp_path)
    s = mtp_cy.MTP(m)
    m.close()                         # deferred: the session keeps the weights (both files) alive
    assert s.generate(prompt_of(split, 2), max_tokens=4, temp=0)
    s.close()
    with pytest.raises(mtp_cy.ClosedError):
        m.mtp_source


def test_cli_run_with_a_sidecar(synthetic):
    split = synthetic.cached_model(layout="sidecar", acceptance=0.75)
    p = subprocess.run([sys.executable, "-m", "mtp_cy", "run", str(split.path), "the sea", "--mtp-head",
                        str(split.mtp_path), "--temp", "0", "--max-tokens", "8", "--n-draft", "3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"MTP head: the sidecar {split.mtp_path}" in p.stderr
    assert p.stdout.strip() == split.greedy(list(mtp_cy.Model(split.path, vocab_only=True).tokenize("the sea")),
                                            8).text.strip()
