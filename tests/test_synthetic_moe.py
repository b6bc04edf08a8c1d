"""mtp_cy.synthetic with arch="qwen35moe": file layout, the scratch-only construction,
and the oracle against upstream's llama-completion / llama-speculative-simple."""
import numpy as np
import pytest

from mtp_cy import synthetic as syn

from synth_upstream import (COMPLETION, SPEC, _private_cache, check_upstream, cycle_back,  # noqa: F401
                            gguf_kv, gguf_tensors, need, run_completion)

MOE_TENSORS = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp_shexp",
               "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
#: projections back into the residual stream: they may only write scratch dimensions
OUT_PROJ = ("attn_output", "ssm_out", "ffn_down", "ffn_down_exps", "ffn_down_shexp")


@pytest.mark.parametrize("mtp, head", [(True, "own"), (True, "shared"), (False, "own")])
def test_moe_gguf_layout(tmp_path, mtp, head):
    m = syn.make_model(tmp_path / "m.gguf", arch="qwen35moe", mtp=mtp, mtp_head=head, n_trunk=4,
                       size=dict(n_expert=6, n_expert_used=3, expert_ff=48, shared_expert_ff=80))
    kv = gguf_kv(m.path)
    assert kv["general.architecture"] == "qwen35moe" and m.arch == "qwen35moe"
    assert kv["qwen35moe.block_count"] == 4 + mtp
    assert kv["qwen35moe.expert_count"] == 6 and kv["qwen35moe.expert_used_count"] == 3
    assert kv["qwen35moe.expert_feed_forward_length"] == 48
    assert kv["qwen35moe.expert_shared_feed_forward_length"] == 80
    assert "qwen35moe.feed_forward_length" not in kv and "n_ff" not in m.dims
    assert kv.get("qwen35moe.nextn_predict_layers") == (1 if mtp else None)
    t = gguf_tensors(m.path)
    D = m.dims["n_embd"]
    for il in range(4 + mtp):
        p = f"blk.{il}."
        for n in MOE_TENSORS:
            assert p + n + ".weight" in t, p + n
        assert p + "ffn_gate.weight" not in t and p + "ffn_down.weight" not in t
        assert t[p + "ffn_gate_inp.weight"].shape == (6, D)
        assert t[p + "ffn_gate_exps.weight"].shape == t[p + "ffn_up_exps.weight"].shape == (6, 48, D)
        assert t[p + "ffn_down_exps.weight"].shape == (6, D, 48)
        assert t[p + "ffn_gate_inp_shexp.weight"].shape == (D,)
        assert t[p + "ffn_down_shexp.weight"].shape == (D, 80)
    assert sum(a.size for a in t.values()) == m.n_params


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_out_projections_write_scratch_only(tmp_path, arch):
    """The construction's premise: every projection back into the residual stream (every
    expert's included) has all-zero rows for the W token directions, the spare direction
    and the bias dimension -- and non-zero scratch rows."""
    m = syn.make_model(tmp_path / "m.gguf", arch=arch, mtp_head="shared")
    special = m.n_words + 2
    seen = 0
    for name, a in gguf_tensors(m.path).items():
        if name.startswith("blk.") and name.split(".")[2] in OUT_PROJ:
            rows = a.reshape((-1,) + a.shape[-2:])          # (experts or 1, D, n_in)
            assert not rows[:, :special, :].any(), name
            assert np.count_nonzero(rows[:, special:, :]) > 0.9 * rows[:, special:, :].size, name
            seen += 1
    n_layers = m.n_trunk + 1
    assert seen == n_layers * (3 if arch == "qwen35moe" else 2)


def test_moe_maps_equal_dense(tmp_path):
    """The oracle of a MoE model is the dense model's: same seed, same f / g / draft_p."""
    a = syn.make_model(tmp_path / "a.gguf", seed=4, acceptance=0.5, eog_after="moon", mtp_head="shared")
    b = syn.make_model(tmp_path / "b.gguf", seed=4, acceptance=0.5, eog_after="moon", mtp_head="shared",
                       arch="qwen35moe")
    assert (a.words, a.f, a.g, a.runner_up, a.draft_p) == (b.words, b.f, b.g, b.runner_up, b.draft_p)
    p = a.encode("star tree")
    assert a.predict(p, 40, 3, rules="upstream") == b.predict(p, 40, 3, rules="upstream")
    assert syn.load_oracle(b.path).arch == "qwen35moe"


def test_moe_draft_cost_counts_active_experts_only(tmp_path):
    size = dict(n_expert=8, n_expert_used=2, expert_ff=64, shared_expert_ff=128)
    m1 = syn.make_model(tmp_path / "a.gguf", arch="qwen35moe", size=size)
    m2 = syn.make_model(tmp_path / "b.gguf", arch="qwen35moe", size=dict(size, n_expert=16))
    c1, c2 = m1.draft_cost(), m2.draft_cost()
    expert = 3 * m1.dims["n_embd"] * 64
    # 8 more experts per layer: the file grows, the work per token only by the router rows
    assert m2.n_params - m1.n_params == (m1.n_trunk + 1) * 8 * (expert + m1.dims["n_embd"])
    assert c2.target_params - c1.target_params == m1.n_trunk * 8 * m1.dims["n_embd"]
    assert c2.draft_params - c1.draft_params == 8 * m1.dims["n_embd"]
    m3 = syn.make_model(tmp_path / "c.gguf", arch="qwen35moe", size=dict(size, n_expert_used=3))
    assert m3.draft_cost().target_params - c1.target_params == m1.n_trunk * expert
    assert m3.draft_cost().draft_params - c1.draft_params == expert


# ---------------------------------------------------------------- upstream

MOE = dict(arch="qwen35moe")


@pytest.mark.parametrize("cfg", [dict(mtp=False), dict(mtp_head="shared", eog_after="sky")],
                         ids=["plain", "shared-eog"])
def test_upstream_completion_moe(cfg):
    need(COMPLETION)
    m = syn.cached_model(**MOE, **cfg)
    prompt = m.encode("the sea")
    for n in (1, 12, 50):
        assert run_completion(m, prompt, n) == m.greedy(prompt, n).text


@pytest.mark.parametrize("cfg", [dict(acceptance=0.5, mtp_head="own"),
                                 dict(acceptance=0.75, mtp_head="shared", n_trunk=3, full_attention_interval=2)],
                         ids=["acc0.5-own", "acc0.75-shared-L3i2"])
def test_upstream_speculative_simple_moe(cfg):
    need(SPEC)
    m = syn.cached_model(**MOE, **cfg)
    for words, n_draft in (("the sea", 1), ("moon star tree", 3)):
        check_upstream(m, m.encode(words), n_draft, 24)


def test_upstream_moe_eog():
    need(SPEC)
    m = syn.cached_model(**MOE, eog_after="sea", seed=3, acceptance=1.0, mtp_head="shared")
    stops = [check_upstream(m, [m.token_ids[2], cycle_back(m, m.eog_after, off)], n_draft, n).stop
             for off, n_draft, n in ((2, 3, 24), (4, 3, 24), (3, 4, 2))]
    assert stops[:2] == ["eog", "eog"]


UPSTREAM_MOE = [dict(acceptance=a, mtp_head=h, n_trunk=nt, full_attention_interval=iv)
                for a in (0.0, 0.25, 1.0) for h in ("own", "shared") for nt, iv in ((4, 4), (5, 2))]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", UPSTREAM_MOE,
                         ids=lambda c: "acc{acceptance}-{mtp_head}-L{n_trunk}i{full_attention_interval}".format(**c))
def test_upstream_speculative_simple_moe_matrix(cfg):
    need(SPEC)
    m = syn.cached_model(**MOE, size=dict(n_expert=16, n_expert_used=4, expert_ff=32, shared_expert_ff=64), **cfg)
    for words, n_draft in (("the sea", 1), ("moon star tree", 2), ("river", 3), ("stone wind", 4)):
        check_upstream(m, m.encode(words), n_draft, 24)


@pytest.mark.slow
def test_upstream_moe_eog_matrix():
    need(SPEC)
    m = syn.cached_model(**MOE, eog_after="sea", seed=3, acceptance=0.5, mtp_head="own")
    stops = []
    for off, n_draft, n in ((1, 3, 24), (2, 3, 24), (3, 2, 24), (4, 3, 24), (3, 4, 2), (5, 1, 24), (6, 4, 5)):
        stops.append(check_upstream(m, [m.token_ids[2], cycle_back(m, m.eog_after, off)], n_draft, n).stop)
    assert "eog" in stops
