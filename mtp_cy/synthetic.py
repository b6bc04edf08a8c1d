"""Synthetic ``qwen35`` / ``qwen35moe`` GGUF models whose every prediction is known in advance.

This module writes small (or, on request, benchmark-sized) GGUF files of
llama.cpp's ``qwen35`` architecture (Qwen3.5 dense: a hybrid trunk of
Gated-DeltaNet recurrent layers with a full-attention layer every
``full_attention_interval`` layers) or ``qwen35moe`` (the same trunk with
mixture-of-experts FFNs) plus one MTP ("NextN") block, using numpy and the
``gguf`` writer only (quantized forms: upstream's ``llama-quantize``).  The
weights are *designed*, not trained, so that

* the target model's greedy next token is a fixed function ``f`` of the
  current token alone, and
* the MTP head's draft is a fixed function ``g`` of the token it is fed,
  with a known probability ``draft_p`` (the number upstream's draft loop
  compares with ``--spec-draft-p-min``),

and a pure-Python oracle (:meth:`SyntheticModel.predict`) can reproduce the
exact greedy continuation *and* the exact speculative-decoding counters of
both upstream's ``llama-speculative-simple --spec-type draft-mtp`` and
mtp_cy's own loop.  ``docs/synthetic.md`` is the user guide (knobs, presets,
generation times); this docstring is the construction.

Construction (why the predictions are exact)
============================================

Notation: ``D = n_embd``, ``S`` = a set of ``W`` word tokens (``" the"``,
``" sea"``, ...; each is a single token of the vocabulary and survives a
BPE round trip, checked with the vocabulary's own merges).  Residual-stream
dimensions are split into

* ``W`` *token directions* ``0..W-1`` (one per member of ``S``),
* one *spare direction* ``W`` (only ever produced by the MTP block, see the
  shared-head case below),
* one *bias dimension* ``b = W+1`` that is 1 for every token,
* ``D-W-2`` *scratch dimensions* (the only dimensions any layer writes to).

Embeddings.  ``token_embd[t] = e_j(t) + e_b`` where ``j(t)`` is the index of
``t`` in ``S``; a token outside ``S`` copies the row of the member
``S[t mod W]`` (so it behaves exactly like that member).

Trunk.  Every projection *into* a layer (q/k/v, the DeltaNet qkv/z/alpha/
beta/conv, FFN gate/up, the MoE router, the experts' gate/up, the shared
expert's gate/up and its sigmoid gate ``ffn_gate_inp_shexp``) is a random
Gaussian, so the attention, the Gated-DeltaNet recurrence, the convolution
state, the FFN and the expert routing really run on non-trivial data.  Every
projection *out of* a layer back into the residual stream (``attn_output``,
``ssm_out``, ``ffn_down``, every expert's slice of ``ffn_down_exps``,
``ffn_down_shexp``) has zero rows except for the scratch dimensions, with
tiny random values there (outputs of norm ~1e-2).  Hence, whichever experts
the router picks and with whatever weights, the token direction and the
bias dimension of the residual stream are carried through the whole trunk
*bit-exactly* (``x + 0 == x``), and the final hidden state is
``x = e_j + e_b + (small scratch noise)``.

Output head.  ``output_norm`` (RMS norm, weight ``sqrt(2/D)``) scales ``x``
by a positive factor; ``output.weight`` has ``-B_t`` in the bias column of
every vocabulary row ``t`` (``B_t = 20`` for members of S, ``60`` for the
EOG token, ``40`` for every other token), ``+B_t`` at ``[f(S[j]), j]`` and ``B_t - 2`` at
``[r(S[j]), j]`` (the *runner-up*), and zeros in all scratch columns.  The
logits are therefore ``c * (0 for f, -2 for the runner-up, -20 for the
other members of S, -60 for EOG, -40 for every other token)`` with ``c > 0`` a common
factor: whatever the layers, the batch width, the thread count or the f16
rounding (the two non-zero activation entries are identical floats), the
argmax is ``f(S[j])``.  (The tiers only matter when something like a
grammar forbids the target and the runner-up: the words of S then win over
other tokens and EOG loses to everything; tokens inside a tier tie exactly,
so which one wins is up to the sampler's tie-breaking.)

``f`` is one long cycle over ``S`` (chosen by ``seed``).  With
``eog_after=w`` the cycle is cut after ``w``: ``f(w)`` is the vocabulary's
EOG token (``tokenizer.ggml.eos_token_id``), so greedy generation through
``w`` ends.

MTP block.  The NextN block (layer ``n_trunk``) gets the RMS-normed token
embedding and the RMS-normed target hidden state, concatenated, through
``nextn.eh_proj``.  ``enorm`` has weight ``sqrt(2/D)`` so the embedding half
is exactly ``e_j + e_b``; the hidden-state half is only routed into scratch
dimensions (tiny weights), so the draft depends on the fed token only.
``eh_proj`` maps ``e_j`` to a direction ``e_d`` and ``e_b`` to ``e_b``; the
block's own attention/FFN (dense or MoE, like the trunk) again only write
scratch dimensions.

* ``mtp_head="own"``: ``nextn.shared_head_norm`` + ``nextn.shared_head_head``
  exist; ``d = j`` and the own head maps direction ``j`` to ``g(S[j])``
  (logit 0; -20 / -40 / -60 for the other members / other tokens / EOG).
* ``mtp_head="shared"`` (real Qwen3.5 layout: no ``shared_head_head``; the
  block reuses ``output.weight``): ``eh_proj`` *steers* ``e_j`` to the
  direction ``d`` that the shared output head maps to ``g(S[j])``, i.e.
  ``d = f^-1(g(S[j]))``.  When ``eog_after`` cuts the cycle, the member
  ``c(w)`` following ``w`` in the cycle has no pre-image under ``f``; the
  spare direction ``W`` is mapped by the output head to that member so the
  MTP block can still draft it (the trunk never produces direction ``W``).
  The draft's logits are the output head's: the runner-up of direction
  ``d`` sits 2 below the draft.

``g(t) = f(t)`` for exactly ``round(acceptance * W)`` members (chosen by
``seed``) and ``g(t)`` is another member of ``S`` (``!= f(t)``) for the
rest.  MTP drafting is a chain: ``d1 = g(last)``, ``d2 = g(d1)``, ...;
verification accepts ``d_i`` while ``d_i == f(previous)`` and then appends
``f(last accepted)``.  All of this is computed by :meth:`SyntheticModel.predict`.

Draft probability and ``draft_confidence``.  Upstream's MTP draft loop
(``common_speculative_impl_draft_mtp::draft``) samples with a ``top_k=10``
chain whose last stage (``dist``) writes the softmax of the 10 surviving
logits, without temperature, into ``cur_p->data[k].p``; the draft is
``data[0]`` (the argmax) and drafting stops, *without* that token, at the
first ``data[0].p < p_min``.  So the number that matters is
``p = 1 / sum_{k<10} exp(l_k - l_0)`` over the 10 largest draft logits; the
generator computes it for every member from the designed logits and stores
it (``draft_p``, :meth:`SyntheticModel.draft_prob`).  By default it is
``1/(1 + 9 e^-20) = 1 - 2e-8`` (own head) and ``~0.881`` (shared head: the runner-up 2 below).
``draft_confidence=c`` (0.52..0.99) makes the head unsure exactly where it is
wrong: on a member with ``g != f`` the draft ``g`` keeps the top logit and
the target's word ``f`` is the runner-up ``delta = ln(c / (1 - c))`` below
(every other token at least 10 below), so ``p ~= c``; where ``g == f`` the
draft stays certain (``p > 0.9999``).  Own head: the ``f`` entry of
``shared_head_head``'s row.  Shared head: ``shared_head_norm`` scales the
draft logits by 5 (the runner-up of a certain draft sits 10 below) and
``eh_proj`` (then stored f32) maps ``e_j`` of an unsure member to a
combination of output-head directions solved (a small linear system) so
that ``g`` gets 0, ``f`` gets ``-delta`` and every other token at most -10.
The target head is unchanged (same ``f``, runner-ups and logits).

MoE (``arch="qwen35moe"``).  Every layer's FFN, the MTP block's included, is
a router (``ffn_gate_inp``, f32) over ``n_expert`` experts of width
``expert_ff`` (``ffn_{gate,up,down}_exps``), ``n_expert_used`` of them per
token (softmax, weights renormalised, as upstream), plus one shared expert
of width ``shared_expert_ff`` gated by ``sigmoid(ffn_gate_inp_shexp . x)``.
Nothing else changes, so ``f``, ``g`` and the oracle are the dense model's.

Sidecar layout (``layout="sidecar"``).  The same weights split into a
trunk-only file (``block_count = n_trunk``, no ``nextn_predict_layers``: a
plain model) and ``mtp-<name>`` next to it: ``block_count = n_trunk + 1``,
``nextn_predict_layers = 1``, the MTP block plus ``token_embd``,
``output_norm`` and ``output`` and no trunk layer (upstream's qwen35 /
qwen35moe loaders then load it "mtp_only": ``blk.0.attn_norm.weight`` is
absent), for ``llama-speculative-simple -m <trunk> -md mtp-<trunk>
--spec-type draft-mtp``.  :func:`mismatched_sidecar` writes sidecars that do
not fit a model (other arch / n_embd / vocabulary, no NextN block).

Sampling at temperature > 0.  The runner-up sits 2 logits (times ``c``,
which is 1 up to ~1e-4) below the greedy token and every other token at
least 20 below, so with llama.cpp's default sampler chain (top-k 40, top-p 0.95,
min-p 0.05 then temperature) the runner-up survives the filters and is
sampled with probability ~12% at ``temp=1`` and ~27% at ``temp=2``; at
``temp=0`` (greedy) it never is.  The runner-up of each member is in
:attr:`SyntheticModel.runner_up`.

Upstream behaviour the ``rules="upstream"`` oracle reproduces
(``examples/speculative-simple`` + ``common/speculative.cpp`` at the pinned
commit): the prompt minus its last token is prefilled; each iteration asks
for ``n_draft_max = max(0, min(n_ctx - n_past - 2, N - n_predict - 1))``
draft tokens, but the MTP implementation always drafts its configured
``--spec-draft-n-max`` tokens (fewer when ``p_min`` stops it) and
``common_speculative_draft`` only truncates when the per-call limit is > 0,
so a limit of 0 yields a *full* draft; verification
(``common_sampler_sample_and_accept_n``) also stops
after an accepted EOG that is not the last draft token; ``n_drafted +=
len(draft)``, ``n_accept += len(ids) - 1``, ``n_predict += len(ids)``, and the
loop ends only once ``n_predict > N`` or on EOG (so it may print up to
``N + n_draft + 1`` tokens).  For
qwen35 the target context gets ``n_rs_seq = n_draft`` (recurrent-state
rollback), so the checkpoint path of speculative-simple never runs.

Quantized files (``dtype="q8_0"`` / ``"q4_k_m"``) are the f16 file run
through upstream's ``llama-quantize`` (:func:`quantize`); it copies the
metadata, so :func:`load_oracle` works on them.  Zero rows stay exactly zero
and the {0, 1} rows of the embedding / ``eh_proj`` keep equal values, so
``f`` and ``g`` survive; the logits move by up to a few tenths (the
quantization error of the +-20 / 18 entries of the heads), well inside the
margin of 2, but ``draft_p`` is the f16 design value.  ``draft_confidence``'s
small gaps would not survive: :func:`quantize` keeps the MTP head's tensors that
carry them in their source types.

Everything the oracle needs (words, ids, ``f``, ``g``, runner-ups, draft
probabilities, EOG, settings) is stored in the GGUF itself under
``mtp_cy.synthetic.*`` so that :func:`load_oracle` rebuilds the
:class:`SyntheticModel` from any generated file.  :func:`cached_model`
generates into ``$MTP_CY_CACHE_DIR`` (default ``~/.cache/mtp_cy/models``)
and reuses files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "GENERATOR_VERSION",
    "SIZES",
    "PRESETS",
    "SyntheticModel",
    "Prediction",
    "make_model",
    "load_oracle",
    "cached_model",
    "quantize",
    "preset_cost",
    "DraftCost",
    "mismatched_sidecar",
    "MISMATCH_KINDS",
    "find_vocab",
    "cache_dir",
    "single_token_id",
]

#: Bumped whenever the generated files (or their metadata) change.
#: 4: ``mtp_cy.synthetic.draft_p`` (the MTP head's draft probability per member).
GENERATOR_VERSION = 4

_KEY = "mtp_cy.synthetic"
_ARCHS = ("qwen35", "qwen35moe")
_LAYOUTS = ("combined", "sidecar")
_SIDECAR_PREFIX = "mtp-"          # upstream's name for an MTP sidecar (common/download.cpp)

# Logit design (in units of the normalised hidden state, see module docstring)
_LOGIT_FLOOR = 40.0   # tokens outside S that are not the target
_LOGIT_FLOOR_S = 20.0  # members of S that are neither the target nor the runner-up
_LOGIT_FLOOR_EOG = 60.0  # the EOG token when it is not the target
_RUNNER_GAP = 2.0     # runner-up distance below the greedy token (target head only)
_TRUNK_NOISE = 1e-2   # norm of what one sub-layer adds to the scratch dimensions
_N_SPECIAL_DIMS = 2   # spare direction + bias dimension
_MIN_SCRATCH = 4

# draft probability (see "Draft probability and draft_confidence")
_DRAFT_TOP_K = 10               # common_speculative_impl_draft_mtp's draft sampler
_CONF_RANGE = (0.52, 0.99)      # allowed draft_confidence
_CONF_HEAD_SCALE = 5.0          # shared head + draft_confidence: draft logits x5
_CONF_MARGIN = 10.0             # ... every token but g and f at least this far below g
# spread (a target with several plausible successors, a head with its own noise)
_SPREAD_RANGE = (2, 8)          # candidates per member
_SPREAD_STEP = 0.5              # target: the i-th candidate sits i * step below the greedy one
_SPREAD_NOISE = (0.25, 2.5)     # own MTP head: its other candidates sit this far below its draft

#: Candidate words: lower-case letters with a leading space, so that a
#: sequence of them is split by the pre-tokenizer at every space.
_CANDIDATE_WORDS = [
    "the", "sea", "sky", "moon", "star", "tree", "river", "stone", "light",
    "wind", "rain", "fire", "bird", "ship", "road", "house", "city", "king",
    "song", "dream", "night", "green", "blue", "red", "small", "old", "new",
    "quiet", "bright", "cold", "warm", "water", "time", "day", "world",
    "snow", "cloud", "hill", "forest", "field", "garden", "door", "window",
    "book", "story", "voice", "heart", "home", "gold", "silver", "iron",
    "wood", "sun", "earth", "ice", "sand", "flower", "leaf", "root", "storm",
    "lake", "boat", "bridge", "tower", "wall", "glass", "paper", "music",
    "winter", "summer", "spring", "morning", "evening", "shadow", "mountain",
    "island", "ocean", "valley", "desert", "village", "castle", "horse",
    "wolf", "fox", "bear", "fish", "apple", "bread", "salt", "milk", "honey",
]

_DIM_KEYS = (
    "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "ssm_d_state",
    "ssm_n_group", "ssm_n_v_heads", "ssm_d_conv", "n_words", "n_ctx_train",
)
#: size keys of ``arch="qwen35moe"`` (which has no ``n_ff``)
_MOE_KEYS = ("n_expert", "n_expert_used", "expert_ff", "shared_expert_ff")

#: Named sizes.  ``n_ff=None`` for ``bench`` means "grow n_ff until the model
#: has at least ``_BENCH_MIN_PARAMS`` parameters".
SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(n_embd=64, n_ff=128, n_head=2, n_head_kv=1, head_dim=32,
                 ssm_d_state=16, ssm_n_group=2, ssm_n_v_heads=4, ssm_d_conv=4,
                 n_words=48, n_ctx_train=8192),
    "bench": dict(n_embd=1024, n_ff=None, n_head=8, n_head_kv=2, head_dim=128,
                  ssm_d_state=128, ssm_n_group=4, ssm_n_v_heads=8, ssm_d_conv=4,
                  n_words=48, n_ctx_train=8192),
}
_BENCH_MIN_PARAMS = 200_000_000
_BENCH_MIN_FF = 4096
#: MoE size keys of ``arch="qwen35moe"`` with ``size="tiny"`` / ``"bench"`` (or a dict
#: overriding the tiny dims); ``n_ff`` is not used by that arch.
_MOE_SIZES: Dict[str, Dict[str, int]] = {
    "tiny": dict(n_expert=8, n_expert_used=2, expert_ff=64, shared_expert_ff=128),
    "bench": dict(n_expert=32, n_expert_used=4, expert_ff=512, shared_expert_ff=1024),
}

_DENSE_2048 = dict(n_embd=2048, n_head=8, n_head_kv=2, head_dim=256, ssm_d_state=128, ssm_n_group=8,
                   ssm_n_v_heads=16, ssm_d_conv=4, n_words=48, n_ctx_train=32768)

#: Benchmark presets (``make_model(path, preset=NAME, dtype=...)``, ``cached_model(preset=NAME)``):
#: models with the cost structure of real MTP models.  A preset fixes ``arch``, ``size``,
#: ``n_trunk``, ``full_attention_interval``, ``mtp_head`` and ``vocab``; everything else
#: (``acceptance``, ``seed``, ``eog_after``, ``draft_confidence``, ``dtype`` incl. the
#: quantized ``"q8_0"`` / ``"q4_k_m"``, ``layout``) is free.  Parameters, file sizes,
#: draft/target cost ratios and generation times: ``docs/synthetic.md``.
PRESETS: Dict[str, Dict[str, Any]] = {
    # ~1.35B dense: 12 Gated-DeltaNet + 4 attention layers, n_ff 8192, MTP head sharing
    # the output head (real Qwen3.5 layout), GPT-2 vocabulary
    "dense-1.3b": dict(arch="qwen35", n_trunk=16, full_attention_interval=4, mtp_head="shared",
                       vocab="gpt-2", size=dict(_DENSE_2048, n_ff=8192)),
    # MoE, ~2.26B parameters of which ~0.62B active per token: the same attention /
    # DeltaNet shapes, 64 experts of width 256 (8 used) plus a shared expert of width 512
    "moe-2.3b-a0.6b": dict(arch="qwen35moe", n_trunk=16, full_attention_interval=4, mtp_head="shared",
                           vocab="gpt-2", size=dict(_DENSE_2048, n_expert=64, n_expert_used=8,
                                                    expert_ff=256, shared_expert_ff=512)),
}
#: make_model arguments a preset fixes
_PRESET_ARGS = ("arch", "size", "n_trunk", "full_attention_interval", "mtp_head", "vocab")

#: dtype -> (llama-quantize type name, general.file_type); f16/f32 are written directly
_QUANT_TYPES = {"q8_0": ("Q8_0", 7), "q4_k_m": ("Q4_K_M", 15)}
_FILE_TYPES = {0: "f32", 1: "f16", **{ft: name for name, (_, ft) in _QUANT_TYPES.items()}}
_DTYPES = ("f16", "f32", *_QUANT_TYPES)


# --------------------------------------------------------------------------
# locating files
# --------------------------------------------------------------------------

def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def find_vocab(vocab: str = "gpt-2", vocab_path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Return the path of ``ggml-vocab-<vocab>.gguf``.

    Looked up, in order: ``vocab_path`` (explicit file), ``vocab`` itself if it
    names an existing ``.gguf`` file, the vocabularies shipped in the package
    (``mtp_cy/vocab/``: ``gpt-2`` and ``qwen35``), ``$MTP_CY_LLAMA_CPP_DIR/models/``,
    and ``<repo>/vendor/llama.cpp/models/``.
    """
    if vocab_path is not None:
        p = Path(vocab_path)
        if not p.is_file():
            raise ValueError(f"vocab_path {str(p)!r} is not a file")
        return p
    if not isinstance(vocab, str) or not vocab:
        raise ValueError(f"vocab must be a non-empty string, got {vocab!r}")
    if vocab.endswith(".gguf") and Path(vocab).is_file():
        return Path(vocab)
    name = f"ggml-vocab-{vocab}.gguf"
    tried = [Path(__file__).resolve().parent / "vocab" / name]
    env = os.environ.get("MTP_CY_LLAMA_CPP_DIR")
    if env:
        tried.append(Path(env) / "models" / name)
    tried.append(_repo_root() / "vendor" / "llama.cpp" / "models" / name)
    for p in tried:
        if p.is_file():
            return p
    raise ValueError(
        f"vocabulary {vocab!r} not found (looked for {', '.join(str(p) for p in tried)}); "
        "set MTP_CY_LLAMA_CPP_DIR or pass vocab_path=")


def cache_dir() -> Path:
    """Directory used by :func:`cached_model`."""
    env = os.environ.get("MTP_CY_CACHE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mtp_cy" / "models"


# --------------------------------------------------------------------------
# vocabulary handling
# --------------------------------------------------------------------------

def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable unicode map (used by all byte-level BPE vocabs)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_B2U = _bytes_to_unicode()


@dataclass
class _Vocab:
    path: Path
    model: str
    tokens: List[str]
    token_types: List[int]
    merges: Dict[tuple, int]
    eos_id: int
    fields: List[tuple]          # (key, value, vtype, sub_type) of every tokenizer.* key

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def bpe(self, text: str) -> List[str]:
        """Byte-level BPE of one pre-tokenized chunk (merge the best-ranked pair first)."""
        word = [_B2U[b] for b in text.encode("utf-8")]
        while len(word) > 1:
            best, best_rank = None, None
            for i in range(len(word) - 1):
                r = self.merges.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            word = word[:best] + [word[best] + word[best + 1]] + word[best + 2:]
        return word


_VOCAB_CACHE: Dict[str, _Vocab] = {}

# GGUF value types (gguf.GGUFValueType)
_GGUF_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read_gguf_kv(path, want=None, stop_when_found=False, until=None) -> Dict[str, tuple]:
    """Read GGUF key/values as ``{key: (value, vtype, sub_type)}``.

    A small reader (much faster than ``gguf.GGUFReader`` on vocabularies):
    only keys accepted by ``want(key)`` are decoded, the others are skipped;
    with ``stop_when_found`` it returns at the first unwanted key after a
    wanted one (make_model writes its own keys as one contiguous group);
    ``until(found)`` returns early once it is true of the keys found so far.
    """
    import mmap
    import struct

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, = struct.unpack_from("<I", mm, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} not supported")
        n_kv, = struct.unpack_from("<Q", mm, 16)
        off = 24
        out: Dict[str, tuple] = {}

        def rstr(o):
            n, = struct.unpack_from("<Q", mm, o)
            return mm[o + 8:o + 8 + n].decode("utf-8", errors="surrogateescape"), o + 8 + n

        def skip_or_read(o, t, decode):
            if t == _GGUF_STRING:
                if decode:
                    return rstr(o)
                n, = struct.unpack_from("<Q", mm, o)
                return None, o + 8 + n
            if t == _GGUF_ARRAY:
                st, n = struct.unpack_from("<IQ", mm, o)
                o += 12
                if st == _GGUF_STRING:
                    vals = [] if decode else None
                    for _ in range(n):
                        ln, = struct.unpack_from("<Q", mm, o)
                        if decode:
                            vals.append(mm[o + 8:o + 8 + ln].decode("utf-8", errors="surrogateescape"))
                        o += 8 + ln
                    return vals, o
                if st == _GGUF_ARRAY:
                    raise ValueError(f"{path}: nested arrays are not supported")
                dt = np.dtype(_GGUF_SCALAR[st])
                vals = np.frombuffer(mm, dtype=dt, count=n, offset=o).tolist() if decode else None
                if decode and st == 7:
                    vals = [bool(v) for v in vals]
                return vals, o + n * dt.itemsize
            dt = np.dtype(_GGUF_SCALAR[t])
            v = np.frombuffer(mm, dtype=dt, count=1, offset=o)[0].item() if decode else None
            if decode and t == 7:
                v = bool(v)
            return v, o + dt.itemsize

        found = False
        for _ in range(n_kv):
            key, off = rstr(off)
            t, = struct.unpack_from("<I", mm, off)
            off += 4
            sub = struct.unpack_from("<I", mm, off)[0] if t == _GGUF_ARRAY else None
            ok = want is None or want(key)
            if not ok and found and stop_when_found:
                break
            val, off = skip_or_read(off, t, ok)
            if ok:
                found = True
                out[key] = (val, t, sub)
                if until is not None and until(out):
                    break
        return out


def _load_vocab(path: Path) -> _Vocab:
    import gguf

    key = str(Path(path).resolve())
    if key in _VOCAB_CACHE:
        return _VOCAB_CACHE[key]
    kv = _read_gguf_kv(path, want=lambda k: k.startswith("tokenizer."))
    fields = [(k, v, gguf.GGUFValueType(t), None if sub is None else gguf.GGUFValueType(sub))
              for k, (v, t, sub) in kv.items()]
    d = {k: v for k, v, _, _ in fields}
    if d.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: only byte-level BPE ('gpt2') vocabularies are supported, "
                         f"got {d.get('tokenizer.ggml.model')!r}")
    tokens = list(d["tokenizer.ggml.tokens"])
    merges = {}
    for i, m in enumerate(d.get("tokenizer.ggml.merges", [])):
        a, _, b = m.partition(" ")
        merges.setdefault((a, b), i)
    eos = d.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ValueError(f"{path}: vocabulary has no tokenizer.ggml.eos_token_id")
    v = _Vocab(path=Path(path), model=d["tokenizer.ggml.model"], tokens=tokens,
               token_types=list(d.get("tokenizer.ggml.token_type", [1] * len(tokens))),
               merges=merges, eos_id=int(eos), fields=fields)
    _VOCAB_CACHE[key] = v
    return v


def single_token_id(piece: str, vocab: str = "gpt-2", vocab_path=None) -> Optional[int]:
    """Id of ``piece`` (e.g. ``" cat"``) if it is one vocabulary token that survives
    a BPE round trip (``tokenize(piece) == [id]``), else ``None``.

    Only meaningful for a piece that the pre-tokenizer keeps whole (one word,
    optionally with one leading space)."""
    voc = _load_vocab(find_vocab(vocab, vocab_path))
    tok = "".join(_B2U[b] for b in piece.encode("utf-8"))
    try:
        tid = voc.tokens.index(tok)
    except ValueError:
        return None
    return tid if voc.bpe(piece) == [tok] else None


def _select_words(vocab: _Vocab, n_words: int) -> List[tuple]:
    """Pick ``n_words`` (word, id) pairs that are single tokens and round-trip through BPE."""
    index = {t: i for i, t in enumerate(vocab.tokens)}
    out = []
    for w in _CANDIDATE_WORDS:
        piece = " " + w
        tok = "".join(_B2U[b] for b in piece.encode("utf-8"))
        tid = index.get(tok)
        if tid is None or vocab.token_types[tid] != 1:   # 1 = LLAMA_TOKEN_TYPE_NORMAL
            continue
        if vocab.bpe(piece) != [tok]:
            continue
        out.append((piece, tid))
        if len(out) == n_words:
            return out
    raise ValueError(f"vocabulary {vocab.path.name} has only {len(out)} usable single-token words, "
                     f"{n_words} requested")



# --------------------------------------------------------------------------
# oracle
# --------------------------------------------------------------------------

@dataclass
class Prediction:
    """Exact outcome of a generation run on a synthetic model.

    ``tokens`` excludes the EOG token.  For ``rules="upstream"`` the
    counters mirror ``llama-speculative-simple``: ``n_predict`` (sampled
    tokens, EOG and anything sampled after it included), ``n_drafted`` and
    ``n_accept``; ``iters``/``drafts_generated``/``drafts_accepted`` are the
    same loop's iterations / ``n_drafted`` / ``n_accept`` and ``tokens``
    are the tokens speculative-simple prints (there may be more than
    ``max_tokens`` of them: it only stops once ``n_predict > N``).
    """

    tokens: List[int]
    text: str
    stop: str                       # "eog" | "max_tokens" | "ctx_full" (rules="mtp_cy")
    iters: int = 0
    drafts_generated: int = 0
    drafts_accepted: int = 0
    tokens_emitted: int = 0
    rules: str = "greedy"
    n_predict: Optional[int] = None
    n_drafted: Optional[int] = None
    n_accept: Optional[int] = None
    #: per iteration of ``rules="mtp_cy"``: (drafts generated, drafts accepted,
    #: tokens appended to ``tokens``), in order -- e.g. to know how much work was
    #: done when a run is cut short after a given token (stop strings)
    steps: List[tuple] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """``drafts_accepted / drafts_generated`` (0.0 when nothing was drafted)."""
        return self.drafts_accepted / self.drafts_generated if self.drafts_generated else 0.0


@dataclass
class DraftCost:
    """Parameters touched per token: one target step vs one MTP draft step.

    ``target_params``: the trunk's layers (for MoE only the router, the
    ``n_expert_used`` routed experts and the shared expert), ``output_norm``,
    the output head and one embedding row.  ``draft_params``: the MTP block
    (``eh_proj``, its norms, attention and (active) FFN), its head (the own
    ``shared_head_head`` or the shared ``output.weight``) and one embedding
    row.  ``ratio = draft_params / target_params`` is the theoretical cost of
    a draft token relative to a target step when decoding is bound by reading
    the weights (the usual case for one sequence).
    """

    target_params: int
    draft_params: int
    total_params: int

    @property
    def ratio(self) -> float:
        """``draft_params / target_params``."""
        return self.draft_params / self.target_params


@dataclass
class SyntheticModel:
    """Description of a generated model and its exact oracle.

    ``path`` is the model file (the trunk file for ``layout="sidecar"``, whose
    MTP sidecar is ``mtp_path``); ``dtype`` the tensor type of that file
    (``"f16"``, ``"f32"``, ``"q8_0"``, ``"q4_k_m"``); ``draft_p[t]`` the
    probability upstream's draft sampler gives the draft after being fed member
    ``t`` (see :meth:`draft_prob`).
    """

    path: Path
    words: List[str]
    token_ids: List[int]
    f: Dict[int, int]
    g: Dict[int, int]
    runner_up: Dict[int, int]
    eog_token_id: int
    eog_after: Optional[int]            # token id whose successor is EOG, or None
    mtp: bool
    mtp_head: str
    acceptance: float
    n_trunk: int
    full_attention_interval: int
    vocab: str
    dtype: str
    size: Any
    seed: int
    dims: Dict[str, int]
    n_vocab: int
    n_params: int
    recurrent_layers: List[bool]
    generator_version: int = GENERATOR_VERSION
    arch: str = "qwen35"
    layout: str = "combined"
    mtp_path: Optional[Path] = None
    draft_confidence: Optional[float] = None
    preset: Optional[str] = None
    spread: Optional[int] = None
    draft_p: Dict[int, float] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- token helpers ---------------------------------------------------

    @property
    def n_words(self) -> int:
        """``|S|``, the number of word tokens."""
        return len(self.token_ids)

    @property
    def pieces(self) -> Dict[int, str]:
        """Token id -> text of every member of S."""
        return dict(zip(self.token_ids, self.words))

    @property
    def accepted(self) -> List[int]:
        """Members of S on which the MTP draft agrees with the target (g == f)."""
        return [t for t in self.token_ids if self.g.get(t) == self.f[t]]

    @property
    def files(self) -> List[Path]:
        """Every file of the model: ``[path]``, plus ``mtp_path`` for a sidecar layout."""
        return [self.path] + ([self.mtp_path] if self.mtp_path is not None else [])

    def member(self, token: int) -> int:
        """The member of S that ``token`` behaves like (itself if it is in S)."""
        if token in self.f:
            return token
        if not (0 <= int(token) < self.n_vocab):
            raise ValueError(f"token {token} outside the vocabulary (n_vocab={self.n_vocab})")
        return self.token_ids[int(token) % self.n_words]

    def next_token(self, token: int) -> int:
        """Target model's greedy next token after ``token``."""
        return self.f[self.member(token)]

    def draft_token(self, token: int) -> int:
        """MTP head's draft after being fed ``token``."""
        if not self.mtp:
            raise ValueError(f"{self.path} has no MTP block")
        return self.g[self.member(token)]

    def draft_prob(self, token: int) -> float:
        """Probability of the MTP head's draft after being fed ``token``: the softmax of
        the 10 largest draft logits at the draft, i.e. the ``cur_p->data[0].p`` that
        upstream's MTP draft loop compares with ``p_min`` (exact for f16/f32 files up to
        the common factor ``c = 1 +- 1e-4`` of the logits; quantized files move it
        slightly)."""
        if not self.mtp:
            raise ValueError(f"{self.path} has no MTP block")
        if not self.draft_p:
            raise ValueError(f"{self.path} predates draft probabilities (generator version "
                             f"{self.generator_version} < 4); generate it again")
        return self.draft_p[self.member(token)]

    def draft_cost(self) -> DraftCost:
        """Parameters touched per target step and per MTP draft step (:class:`DraftCost`)."""
        if not self.mtp:
            raise ValueError(f"{self.path} has no MTP block")
        tgt, dft = _step_params(self.dims, self.arch, self.recurrent_layers, self.mtp_head, self.n_vocab)
        return DraftCost(target_params=tgt, draft_params=dft, total_params=self.n_params)

    def is_eog(self, token: int) -> bool:
        """True for the vocabulary's EOG token (the one ``eog_after`` leads to)."""
        return token == self.eog_token_id

    def encode(self, text_or_words: Union[str, Sequence[str]]) -> List[int]:
        """Token ids of a text made of words of S (``" the sea"``) or of a word list."""
        if isinstance(text_or_words, str):
            words = [" " + w for w in text_or_words.split()]
        else:
            words = [w if w.startswith(" ") else " " + w for w in text_or_words]
        index = dict(zip(self.words, self.token_ids))
        try:
            return [index[w] for w in words]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} is not in the synthetic word set") from None

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of tokens of S (EOG is rendered as nothing)."""
        p = self.pieces
        out = []
        for t in tokens:
            if t in p:
                out.append(p[t])
            elif self.is_eog(t):
                continue
            else:
                raise ValueError(f"token {t} is not a member of S; its text is unknown to the oracle")
        return "".join(out)

    def _check_prompt(self, prompt_tokens: Sequence[int]) -> List[int]:
        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise ValueError("prompt_tokens must contain at least one token")
        for t in prompt:
            if not (0 <= t < self.n_vocab):
                raise ValueError(f"prompt token {t} outside the vocabulary (n_vocab={self.n_vocab})")
        return prompt

    def _chain(self, last: int, n: int, p_min: float = 0.0) -> List[int]:
        """Up to ``n`` chained drafts; stops before the first one whose probability < p_min."""
        out = []
        for _ in range(n):
            if p_min > 0.0 and self.draft_prob(last) < p_min:
                break
            last = self.draft_token(last)
            out.append(last)
        return out

    def _verify(self, last: int, draft: Sequence[int], stop_after_eog: bool) -> List[int]:
        """Target's tokens for the batch [last, *draft] under greedy sampling."""
        ids = []
        prev = last
        for i, d in enumerate(draft):
            t = self.next_token(prev)
            ids.append(t)
            if d != t:
                return ids
            if stop_after_eog and self.is_eog(t) and i + 1 < len(draft):
                return ids
            prev = t
        ids.append(self.next_token(prev))
        return ids

    # ---- generation ------------------------------------------------------

    def greedy(self, prompt_tokens: Sequence[int], max_tokens: int) -> Prediction:
        """Plain greedy continuation (iterate f), EOG excluded, at most ``max_tokens``."""
        prompt = self._check_prompt(prompt_tokens)
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        out: List[int] = []
        last = prompt[-1]
        stop = "max_tokens"
        iters = 0
        while len(out) < max_tokens:
            last = self.next_token(last)
            iters += 1
            if self.is_eog(last):
                stop = "eog"
                break
            out.append(last)
        return Prediction(tokens=out, text=self.decode(out), stop=stop, iters=iters,
                          tokens_emitted=len(out), rules="greedy")

    def predict(self, prompt_tokens: Sequence[int], max_tokens: int, n_draft: int,
                rules: str = "mtp_cy", n_ctx: int = 2048, p_min: float = 0.0) -> Prediction:
        """Exact result of MTP speculative decoding at temperature 0.

        ``rules="mtp_cy"``: mtp_cy's loop (see the package docs): prefill the
        prompt minus its last token; per iteration draft
        ``n_max = min(n_draft, max_tokens - emitted - 1, n_ctx - n_past - 1)``
        tokens (none when ``n_max <= 0``; generation ends with
        ``stop == "ctx_full"`` once ``n_past`` reaches ``n_ctx``), verify ``[last, *draft]``, accept
        the longest agreeing prefix plus the target's own next token and emit
        them; EOG ends generation (not emitted), generation stops exactly at
        ``max_tokens``.  As in upstream's ``common_sampler_sample_and_accept_n``,
        acceptance stops at an EOG the target confirms before the last draft
        position: that EOG is the iteration's own token (not counted in
        ``drafts_accepted``) and the drafts after it are rejected.

        ``rules="upstream"``: ``llama-speculative-simple --spec-type draft-mtp
        --spec-draft-n-max n_draft -n max_tokens -c n_ctx --temp 0``
        (``--spec-draft-p-min p_min``).

        ``p_min`` (both rules): drafting stops at the first draft whose
        probability (:meth:`draft_prob` of the token it is drafted from) is
        below ``p_min``; that token is not drafted (upstream's
        ``cur_p->data[0].p < p_min`` with ``--spec-draft-n-min 0``).
        """
        if not self.mtp:
            raise ValueError(f"{self.path} has no MTP block; use greedy()")
        prompt = self._check_prompt(prompt_tokens)
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
        if not isinstance(n_draft, (int, np.integer)) or n_draft < 0:
            raise ValueError(f"n_draft must be an int >= 0, got {n_draft!r}")
        if isinstance(p_min, bool) or not isinstance(p_min, (int, float, np.floating, np.integer)) \
                or not (0.0 <= float(p_min) <= 1.0):
            raise ValueError(f"p_min must be a number in [0, 1], got {p_min!r}")
        p_min = float(p_min)
        if rules == "mtp_cy":
            return self._predict_mtp_cy(prompt, int(max_tokens), int(n_draft), int(n_ctx), p_min)
        if rules == "upstream":
            if n_draft < 1:
                raise ValueError("rules='upstream' needs n_draft >= 1 (--spec-draft-n-max)")
            return self._predict_upstream(prompt, int(max_tokens), int(n_draft), int(n_ctx), p_min)
        raise ValueError(f"rules must be 'mtp_cy' or 'upstream', got {rules!r}")

    def _predict_mtp_cy(self, prompt: List[int], max_tokens: int, n_draft: int, n_ctx: int,
                        p_min: float) -> Prediction:
        out: List[int] = []
        last = prompt[-1]
        n_past = len(prompt) - 1
        iters = drafted = accepted = 0
        steps = []
        stop = "max_tokens"
        while len(out) < max_tokens:
            if n_past >= n_ctx:
                stop = "ctx_full"          # every position of the context holds a token
                break
            n_max = min(n_draft, max_tokens - len(out) - 1, n_ctx - n_past - 1)
            draft = self._chain(last, n_max, p_min) if n_max > 0 else []
            ids = self._verify(last, draft, stop_after_eog=True)
            iters += 1
            drafted += len(draft)
            accepted += len(ids) - 1
            n_past += len(ids)
            eog = False
            n_before = len(out)
            for t in ids:
                if self.is_eog(t):
                    eog = True
                    break
                out.append(t)
                last = t
                if len(out) == max_tokens:
                    break
            steps.append((len(draft), len(ids) - 1, len(out) - n_before))
            if eog:
                stop = "eog"
                break
        return Prediction(tokens=out, text=self.decode(out), stop=stop, iters=iters,
                          drafts_generated=drafted, drafts_accepted=accepted,
                          tokens_emitted=len(out), rules="mtp_cy", steps=steps)

    def _predict_upstream(self, prompt: List[int], n_predict_max: int, n_draft: int, n_ctx: int,
                          p_min: float) -> Prediction:
        # examples/speculative-simple/speculative-simple.cpp, temp 0, MTP draft.
        out: List[int] = []
        id_last = prompt[-1]
        n_past = len(prompt) - 1
        n_predict = n_drafted = n_accept = iters = 0
        has_eos = False
        while True:
            n_draft_max = n_ctx - n_past - 2
            if n_predict_max >= 0:
                n_draft_max = min(n_draft_max, n_predict_max - n_predict - 1)
            n_draft_max = max(n_draft_max, 0)
            # the MTP impl always drafts its configured n_max (or until p < p_min);
            # common_speculative_draft truncates only when the per-call n_max is > 0
            draft = self._chain(id_last, n_draft, p_min)
            if n_draft_max > 0:
                draft = draft[:n_draft_max]
            n_past += 1
            ids = self._verify(id_last, draft, stop_after_eog=True)
            iters += 1
            n_past += len(ids) - 1
            n_drafted += len(draft)
            n_accept += len(ids) - 1
            n_predict += len(ids)
            for t in ids:
                id_last = t
                if self.is_eog(t):
                    has_eos = True
                    break
                out.append(t)
            if (n_predict_max >= 0 and n_predict > n_predict_max) or has_eos:
                break
        return Prediction(tokens=out, text=self.decode(out), stop="eog" if has_eos else "max_tokens",
                          iters=iters, drafts_generated=n_drafted, drafts_accepted=n_accept,
                          tokens_emitted=len(out), rules="upstream",
                          n_predict=n_predict, n_drafted=n_drafted, n_accept=n_accept)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _dim_keys(arch: str) -> Tuple[str, ...]:
    if arch == "qwen35moe":
        return tuple(k for k in _DIM_KEYS if k != "n_ff") + _MOE_KEYS
    return _DIM_KEYS


def _resolve_dims(size, recurrent: List[bool], mtp: bool, mtp_head: str, n_vocab: int,
                  arch: str = "qwen35") -> Dict[str, int]:
    moe = arch == "qwen35moe"
    keys = _dim_keys(arch)
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)} or a dict of dims, got {size!r}")
    elif isinstance(size, Mapping):
        unknown = set(size) - set(keys)
        if unknown:
            hint = ""
            if not moe and unknown & set(_MOE_KEYS):
                hint = " (MoE keys need arch='qwen35moe')"
            elif moe and "n_ff" in unknown:
                hint = " (qwen35moe has no n_ff: use expert_ff / shared_expert_ff)"
            raise ValueError(f"unknown size keys {sorted(unknown)}{hint}; allowed for arch={arch!r}: {list(keys)}")
    else:
        raise ValueError(f"size must be 'tiny', 'bench' or a dict, got {size!r}")
    base = size if isinstance(size, str) else "tiny"
    dims = dict(SIZES[base])
    if moe:
        del dims["n_ff"]
        dims.update(_MOE_SIZES[base])
    if isinstance(size, Mapping):
        dims.update(size)
    auto_ff = not moe and dims["n_ff"] is None
    if auto_ff:
        dims["n_ff"] = _BENCH_MIN_FF
    for k in keys:
        v = dims[k]
        if not _is_int(v) or v <= 0:
            raise ValueError(f"size[{k!r}] must be a positive int, got {v!r}")
        dims[k] = int(v)
    if dims["n_words"] < 3:
        raise ValueError("n_words must be >= 3 (f must be one cycle and g must be able to differ)")
    need = dims["n_words"] + _N_SPECIAL_DIMS + _MIN_SCRATCH
    if dims["n_embd"] < need:
        raise ValueError(f"n_embd={dims['n_embd']} too small for n_words={dims['n_words']}: need >= {need}")
    if dims["head_dim"] % 8 != 0:
        raise ValueError("head_dim must be a multiple of 8 (rope dims = head_dim/4, even)")
    if dims["n_head"] % dims["n_head_kv"] != 0:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if dims["ssm_n_v_heads"] % dims["ssm_n_group"] != 0:
        raise ValueError("ssm_n_v_heads must be a multiple of ssm_n_group")
    if moe:
        if dims["n_expert"] < 2:
            raise ValueError(f"n_expert must be >= 2, got {dims['n_expert']}")
        if dims["n_expert_used"] > dims["n_expert"]:
            raise ValueError(f"n_expert_used={dims['n_expert_used']} > n_expert={dims['n_expert']}")
    if auto_ff:
        while _count_params(dims, recurrent, mtp, mtp_head, n_vocab) < _BENCH_MIN_PARAMS:
            dims["n_ff"] += 512
    return dims


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.floating, np.integer)) \
        and math.isfinite(float(x))


#: True lets make_model write a trunk of one kind of layer only (interval < 2 or > n_trunk):
#: files llama.cpp loads but cannot run, for the tests of mtp_cy's refusal of them
_ALLOW_DEGENERATE_PATTERN = False


def _validate(mtp, acceptance, n_trunk, full_attention_interval, mtp_head, dtype, seed,
              arch="qwen35", layout="combined", draft_confidence=None, spread=None):
    if not isinstance(mtp, bool):
        raise ValueError(f"mtp must be a bool, got {mtp!r}")
    if not _is_number(acceptance) or not (0.0 <= float(acceptance) <= 1.0):
        raise ValueError(f"acceptance must be a number in [0, 1], got {acceptance!r}")
    if not _is_int(n_trunk) or n_trunk < 2:
        raise ValueError(f"n_trunk must be an int >= 2 (at least one recurrent and one attention layer), got {n_trunk!r}")
    if n_trunk > 256:
        raise ValueError(f"n_trunk must be <= 256, got {n_trunk}")
    if not _is_int(full_attention_interval):
        raise ValueError(f"full_attention_interval must be an int, got {full_attention_interval!r}")
    if full_attention_interval < 2 and not _ALLOW_DEGENERATE_PATTERN:
        raise ValueError(
            f"full_attention_interval={full_attention_interval} gives a trunk without recurrent "
            "(Gated-DeltaNet) layers; the pinned llama.cpp aborts with GGML_ASSERT(buffer) on such a "
            "qwen35 model. Use an interval >= 2.")
    if full_attention_interval > n_trunk and not _ALLOW_DEGENERATE_PATTERN:
        raise ValueError(
            f"full_attention_interval={full_attention_interval} > n_trunk={n_trunk} gives a trunk without "
            "full-attention layers; the pinned llama.cpp aborts with GGML_ASSERT(buffer) on such a "
            "qwen35 model. Use 2 <= full_attention_interval <= n_trunk.")
    if mtp_head not in ("own", "shared"):
        raise ValueError(f"mtp_head must be 'own' or 'shared', got {mtp_head!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {list(_ARCHS)}, got {arch!r}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {list(_LAYOUTS)}, got {layout!r}")
    if layout == "sidecar" and not mtp:
        raise ValueError("layout='sidecar' needs mtp=True (the sidecar is the MTP block)")
    if draft_confidence is not None:
        lo, hi = _CONF_RANGE
        if not _is_number(draft_confidence) or not (lo <= float(draft_confidence) <= hi):
            raise ValueError(f"draft_confidence must be None or a number in [{lo}, {hi}], got {draft_confidence!r}")
        if not mtp:
            raise ValueError("draft_confidence needs mtp=True")
    if spread is not None:
        lo, hi = _SPREAD_RANGE
        if not _is_int(spread) or not (lo <= spread <= hi):
            raise ValueError(f"spread must be None or an int in [{lo}, {hi}], got {spread!r}")
        if draft_confidence is not None:
            raise ValueError("spread and draft_confidence are two designs of the heads' runner-ups; pass one")


def _resolve_eog_after(eog_after, words: List[str], ids: List[int]) -> Optional[int]:
    if eog_after is None:
        return None
    if isinstance(eog_after, bool):
        raise ValueError(f"eog_after must be a word, an index into S or a token id of S, got {eog_after!r}")
    if _is_int(eog_after):
        i = int(eog_after)
        if 0 <= i < len(ids):
            return ids[i]
        if i in ids:
            return i
        raise ValueError(f"eog_after={i} is neither an index into S (0..{len(ids) - 1}) nor a token id of S")
    if isinstance(eog_after, str):
        for w, t in zip(words, ids):
            if eog_after == w or eog_after == w.strip():
                return t
        raise ValueError(f"eog_after={eog_after!r} is not a word of S ({[w.strip() for w in words]})")
    raise ValueError(f"eog_after must be a word, an index into S or a token id of S, got {eog_after!r}")


# --------------------------------------------------------------------------
# shapes and parameter counts
# --------------------------------------------------------------------------

def _layer_shapes(dims: Dict[str, int], arch: str = "qwen35"):
    """(norms, attention, recurrent mixer, FFN) tensor shapes of one layer (numpy order)."""
    D = dims["n_embd"]
    hd, nh, nkv = dims["head_dim"], dims["n_head"], dims["n_head_kv"]
    ds, ng, nv, dc = dims["ssm_d_state"], dims["ssm_n_group"], dims["ssm_n_v_heads"], dims["ssm_d_conv"]
    key_dim, value_dim = ds * ng, ds * nv
    conv_dim = 2 * key_dim + value_dim
    if arch == "qwen35moe":
        E, Fe, Fs = dims["n_expert"], dims["expert_ff"], dims["shared_expert_ff"]
        ffn = {"ffn_gate_inp": (E, D), "ffn_gate_exps": (E, Fe, D), "ffn_up_exps": (E, Fe, D),
               "ffn_down_exps": (E, D, Fe), "ffn_gate_inp_shexp": (D,), "ffn_gate_shexp": (Fs, D),
               "ffn_up_shexp": (Fs, D), "ffn_down_shexp": (D, Fs)}
    else:
        F = dims["n_ff"]
        ffn = {"ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    norms = {"attn_norm": (D,), "post_attention_norm": (D,)}
    attn = {"attn_q": (2 * nh * hd, D), "attn_k": (nkv * hd, D), "attn_v": (nkv * hd, D),
            "attn_output": (D, nh * hd), "attn_q_norm": (hd,), "attn_k_norm": (hd,)}
    recr = {"attn_qkv": (conv_dim, D), "attn_gate": (value_dim, D), "ssm_conv1d": (conv_dim, dc),
            "ssm_dt": (nv,), "ssm_a": (nv,), "ssm_beta": (nv, D), "ssm_alpha": (nv, D),
            "ssm_norm": (ds,), "ssm_out": (D, value_dim)}
    return norms, attn, recr, ffn


def _size(shapes: Mapping[str, tuple]) -> int:
    return sum(int(np.prod(s)) for s in shapes.values())


def _ffn_active(dims, arch, ffn) -> int:
    """Parameters of one FFN that one token touches (MoE: router, used experts, shared expert)."""
    if arch != "qwen35moe":
        return _size(ffn)
    E, U = dims["n_expert"], dims["n_expert_used"]
    experts = sum(int(np.prod(ffn[k])) for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
    return _size(ffn) - experts + experts // E * U


def _count_params(dims, recurrent: List[bool], mtp, mtp_head, n_vocab, arch="qwen35") -> int:
    """Number of parameters make_model() writes for these settings."""
    D = dims["n_embd"]
    norms, attn, recr, ffn = _layer_shapes(dims, arch)
    n = 2 * n_vocab * D + D  # token_embd, output, output_norm
    n_recr = sum(1 for r in recurrent if r)
    n_attn = len(recurrent) - n_recr
    n += len(recurrent) * (_size(norms) + _size(ffn)) + n_attn * _size(attn) + n_recr * _size(recr)
    if mtp:
        n += _size(norms) + _size(ffn) + _size(attn) + 2 * D * D + 3 * D
        if mtp_head == "own":
            n += n_vocab * D
    return n


def _step_params(dims, arch, recurrent: List[bool], mtp_head, n_vocab) -> Tuple[int, int]:
    """(parameters touched by one target step, by one MTP draft step), per token."""
    D = dims["n_embd"]
    norms, attn, recr, ffn = _layer_shapes(dims, arch)
    ffn_act = _ffn_active(dims, arch, ffn)
    head = n_vocab * D
    target = D + sum(_size(norms) + ffn_act + (_size(recr) if r else _size(attn)) for r in recurrent) + D + head
    draft = D + 2 * D * D + 3 * D + _size(norms) + _size(attn) + ffn_act + head
    return target, draft


def _recurrent_pattern(n_trunk: int, interval: int) -> List[bool]:
    return [(i + 1) % interval != 0 for i in range(n_trunk)]


def _single_cycle(rng, n: int) -> List[int]:
    order = [int(x) for x in rng.permutation(n)]
    nxt = [0] * n
    for k in range(n):
        nxt[order[k]] = order[(k + 1) % n]
    return nxt


# --------------------------------------------------------------------------
# design: the maps and the logits of both heads
# --------------------------------------------------------------------------

class _Design:
    """The token maps and head logits of one model (no weights).

    Heads are described by sparse columns: column ``d`` of a head maps residual
    direction ``d`` to ``{token: weight}``; every row also has ``-floor[token]`` in
    the bias column.  A hidden state ``x = sum_d coef_d e_d + e_b`` (after the head's
    RMS norm, times ``s``) gives the logits ``s * (sum_d coef_d col_d[t] - floor[t])``.
    """

    def __init__(self, voc: _Vocab, W: int, seed: int, acceptance: float, eog_after, mtp: bool,
                 mtp_head: str, draft_confidence: Optional[float], spread: Optional[int] = None):
        sel = _select_words(voc, W)
        self.words = [w for w, _ in sel]
        self.ids = ids = [t for _, t in sel]
        self.W = W
        self.n_vocab = voc.n_vocab
        id_index = {t: j for j, t in enumerate(ids)}
        if voc.eos_id in id_index or not (0 <= voc.eos_id < voc.n_vocab):
            raise ValueError("vocabulary EOS token collides with the word set")
        self.eog_tok = eog_tok = voc.eos_id
        self.eog_after = _resolve_eog_after(eog_after, self.words, ids)

        # ---- the maps (structure rng) ---------------------------------------
        srng = np.random.default_rng([int(seed), 0x5EED])
        cyc = _single_cycle(srng, W)                         # index -> index
        f_idx: List[Optional[int]] = list(cyc)               # None = EOG
        if self.eog_after is not None:
            f_idx[id_index[self.eog_after]] = None
        # target head: direction d -> token; spare direction -> the orphaned member
        orphan = cyc[id_index[self.eog_after]] if self.eog_after is not None else cyc[0]
        self.dir_target = [ids[i] if i is not None else eog_tok for i in f_idx] + [ids[orphan]]
        self.runner = []
        for tgt in self.dir_target:
            choices = [t for t in ids if t != tgt]
            self.runner.append(int(choices[int(srng.integers(len(choices)))]))
        # spread: direction d gives `spread` candidates, the target at 0 and the others i * step
        # below it (own rng: the maps above stay those of the same seed without spread)
        self.spread = None if spread is None else int(spread)
        self.spread_cols: List[Dict[int, float]] = []
        if self.spread:
            prng = np.random.default_rng([int(seed), 0x5B7EAD])
            for d, tgt in enumerate(self.dir_target):
                choices = [t for t in ids if t != tgt]
                others = [int(choices[i]) for i in prng.permutation(len(choices))[:self.spread - 1]]
                self.runner[d] = others[0]
                self.spread_cols.append({tgt: 0.0, **{t: -_SPREAD_STEP * (i + 1) for i, t in enumerate(others)}})
        self.f = {ids[j]: self.dir_target[j] for j in range(W)}
        self.runner_up = {ids[j]: self.runner[j] for j in range(W)}

        n_acc = int(round(float(acceptance) * W))
        acc_set = set(int(x) for x in srng.permutation(W)[:n_acc])
        self.g: Dict[int, int] = {}
        for j in range(W):
            if j in acc_set:
                self.g[ids[j]] = self.f[ids[j]]
            else:
                choices = [t for t in ids if t != self.f[ids[j]]]
                self.g[ids[j]] = int(choices[int(srng.integers(len(choices)))])

        self.floor = np.full(voc.n_vocab, _LOGIT_FLOOR, dtype=np.float32)
        self.floor[ids] = _LOGIT_FLOOR_S
        self.floor[eog_tok] = _LOGIT_FLOOR_EOG
        # token -> the direction the output head maps to it (lowest one: the spare
        # direction duplicates a member's when there is no eog_after)
        self.dir_of: Dict[int, int] = {}
        for d in reversed(range(W + 1)):
            self.dir_of[self.dir_target[d]] = d
        self.special = ids + [eog_tok]          # tokens whose logits differ from the -40 tier

        self.mtp, self.mtp_head = mtp, mtp_head
        self.seed = int(seed)
        self.confidence = None if draft_confidence is None else float(draft_confidence)
        self.unsure = [j for j in range(W) if self.g[ids[j]] != self.f[ids[j]]] \
            if (mtp and self.confidence is not None) else []
        self.delta = math.log(self.confidence / (1.0 - self.confidence)) if self.confidence else 0.0
        # MTP: x_j = sum_d mix[j][d] e_d + e_b, times head_scale (shared_head_norm) after the norm
        self.head_scale = _CONF_HEAD_SCALE if (self.unsure and mtp_head == "shared") else 1.0
        self.own_cols: List[Dict[int, float]] = []
        self.mix: List[Dict[int, float]] = []
        if mtp:
            self._design_mtp()

    # ---- heads -----------------------------------------------------------------

    def target_col(self, d: int) -> Dict[int, float]:
        """Column ``d`` of output.weight (without the bias column)."""
        if self.spread:
            return {t: float(self.floor[t]) + v for t, v in self.spread_cols[d].items()}
        tgt, run = self.dir_target[d], self.runner[d]
        return {tgt: float(self.floor[tgt]), run: float(self.floor[run]) - _RUNNER_GAP}

    def _mtp_col(self, d: int) -> Dict[int, float]:
        return self.own_cols[d] if self.mtp_head == "own" else self.target_col(d)

    def _z(self, coef: Mapping[int, float], col: Callable[[int], Dict[int, float]]) -> Dict[int, float]:
        z = {t: -float(self.floor[t]) for t in self.special}
        for d, c in coef.items():
            for t, v in col(d).items():
                z[t] += c * v
        return z

    def _scale(self, coef: Mapping[int, float]) -> float:
        """Factor of the logits: RMS norm of x (norm weight head_scale*sqrt(2/D))."""
        return self.head_scale * math.sqrt(2.0) / math.sqrt(1.0 + sum(c * c for c in coef.values()))

    def _design_mtp(self):
        W, ids = self.W, self.ids
        f16 = lambda v: float(np.float16(v))   # noqa: E731  (the own head is stored f16)
        unsure = set(self.unsure)
        nrng = np.random.default_rng([int(self.seed), 0x0015E])
        if self.mtp_head == "own":
            for j in range(W):
                g, f = self.g[ids[j]], self.f[ids[j]]
                col = {g: float(self.floor[g])}
                if j in unsure:
                    col[f] = f16(float(self.floor[f]) - self.delta)
                if self.spread:
                    # the head knows the target's candidates, with gaps of its own
                    lo, hi = _SPREAD_NOISE
                    for t in self.spread_cols[j]:
                        if t != g:
                            col[t] = f16(float(self.floor[t]) - float(nrng.uniform(lo, hi)))
                self.own_cols.append(col)
            self.own_cols.append({})            # spare direction: unused by the own head
            self.mix = [{j: 1.0} for j in range(W)]
        else:
            self.mix = [{self.dir_of[self.g[ids[j]]]: 1.0} for j in range(W)]
            for j in unsure:
                self.mix[j] = self._solve_unsure(j)

    def _solve_unsure(self, j: int) -> Dict[int, float]:
        """Shared head: coefficients of output-head directions that give the draft g logit 0,
        the target's f logit -delta and every other token at most -_CONF_MARGIN."""
        g, f = self.g[self.ids[j]], self.f[self.ids[j]]
        target = {g: 0.0, f: -self.delta}
        coef = {self.dir_of[g]: 1.0, self.dir_of[f]: 1.0}
        s = self._scale(coef)
        for _ in range(200):
            toks = list(target)
            dirs = [self.dir_of[t] for t in toks]
            a = np.array([[self.target_col(d).get(t, 0.0) for d in dirs] for t in toks])
            rhs = np.array([float(self.floor[t]) + target[t] / s for t in toks])
            coef = dict(zip(dirs, np.linalg.solve(a, rhs).tolist()))
            s_new = self._scale(coef)
            z = self._z(coef, self.target_col)
            over = [t for t in self.special if t not in target and s_new * z[t] > -_CONF_MARGIN]
            for t in over:
                target[t] = -_CONF_MARGIN
            if not over and abs(s_new - s) <= 1e-12 * s:
                break
            s = s_new
        else:
            raise AssertionError(f"draft_confidence: no shared-head mix found for member {j}")
        return {d: float(np.float32(c)) for d, c in coef.items()}     # eh_proj is stored f32

    # ---- draft probabilities ---------------------------------------------------------

    def draft_logits(self, j: int) -> Tuple[Dict[int, float], float]:
        """MTP logits of member j: ({token: logit} for S and EOG, logit of every other token)."""
        coef = self.mix[j]
        s = 1.0 if self.mtp_head == "own" else self._scale(coef)
        z = self._z(coef, self._mtp_col)
        return {t: s * v for t, v in z.items()}, -s * _LOGIT_FLOOR

    def draft_p(self, j: int) -> float:
        """Softmax of the top-10 draft logits at the draft (upstream's cur_p->data[0].p)."""
        logits, other = self.draft_logits(j)
        n_other = self.n_vocab - len(logits)
        top = sorted(list(logits.values()) + [other] * min(n_other, _DRAFT_TOP_K), reverse=True)[:_DRAFT_TOP_K]
        best = max(logits, key=logits.get)
        if best != self.g[self.ids[j]] or sorted(logits.values())[-2] >= top[0]:
            raise AssertionError(f"internal: the MTP head does not draft g for member {j}")
        return 1.0 / sum(math.exp(v - top[0]) for v in top)


# --------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------

class _Builder:
    """Collects tensor specs (name, numpy shape, dtype, generator) in file order; the
    generators run, in that order, only while the files are written (one tensor in
    memory at a time), drawing from one weight rng."""

    def __init__(self, dims, rng, dtype, arch):
        self.dims = dims
        self.arch = arch
        self.rng = rng
        self.np_dtype = np.float16 if dtype == "f16" else np.float32
        self.specs: List[tuple] = []
        D, W = dims["n_embd"], dims["n_words"]
        self.D, self.W = D, W
        self.spare = W
        self.bias = W + 1
        self.scratch = np.arange(W + _N_SPECIAL_DIMS, D)

    def add(self, name, shape, make: Callable[[], np.ndarray], force_f32=False):
        shape = tuple(int(s) for s in shape)
        dt = np.float32 if (force_f32 or len(shape) <= 1) else self.np_dtype
        self.specs.append((name, shape, np.dtype(dt), make))

    def const(self, name, arr, force_f32=False):
        self.add(name, np.shape(arr), lambda: arr, force_f32)

    def rand(self, name, shape, std, force_f32=False):
        self.add(name, shape, lambda: self.randn(shape, std), force_f32)

    @staticmethod
    def materialize(spec) -> np.ndarray:
        name, shape, dt, make = spec
        arr = np.ascontiguousarray(make(), dtype=dt)
        if arr.shape != shape:
            raise AssertionError(f"{name}: shape {arr.shape} != {shape}")
        if not np.all(np.isfinite(arr)):
            raise AssertionError(f"non-finite values in {name}")
        return arr

    def randn(self, shape, std):
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def into_scratch(self, name, n_in, inner_norm, n_expert=None):
        """Output projection (D, n_in) -- per expert: (n_expert, D, n_in) -- writing only
        scratch dims, total output norm ~_TRUNK_NOISE."""
        lead = () if n_expert is None else (n_expert,)
        n_sc = len(self.scratch)
        std = _TRUNK_NOISE / (max(inner_norm, 1e-3) * math.sqrt(n_sc))

        def make():
            w = np.zeros(lead + (self.D, n_in), dtype=np.float32)
            w[..., self.scratch, :] = self.randn(lead + (n_sc, n_in), std)
            return w
        self.add(name, lead + (self.D, n_in), make)

    def ffn(self, p):
        if self.arch == "qwen35moe":
            return self.moe(p)
        D, F = self.D, self.dims["n_ff"]
        self.rand(p + "ffn_gate.weight", (F, D), 1.0 / math.sqrt(D))
        self.rand(p + "ffn_up.weight", (F, D), 1.0 / math.sqrt(D))
        # silu(N(0,1)) * N(0,1) has rms ~0.6
        self.into_scratch(p + "ffn_down.weight", F, 0.6 * math.sqrt(F))

    def moe(self, p):
        d = self.dims
        D, E, Fe, Fs = self.D, d["n_expert"], d["expert_ff"], d["shared_expert_ff"]
        s = 1.0 / math.sqrt(D)
        # router logits ~N(0,1) on the normed input: varied expert choices
        self.rand(p + "ffn_gate_inp.weight", (E, D), s, force_f32=True)
        self.rand(p + "ffn_gate_exps.weight", (E, Fe, D), s)
        self.rand(p + "ffn_up_exps.weight", (E, Fe, D), s)
        # routing weights sum to 1: the mix of the experts' outputs has norm <= ~_TRUNK_NOISE
        self.into_scratch(p + "ffn_down_exps.weight", Fe, 0.6 * math.sqrt(Fe), n_expert=E)
        self.rand(p + "ffn_gate_inp_shexp.weight", (D,), s)
        self.rand(p + "ffn_gate_shexp.weight", (Fs, D), s)
        self.rand(p + "ffn_up_shexp.weight", (Fs, D), s)
        self.into_scratch(p + "ffn_down_shexp.weight", Fs, 0.6 * math.sqrt(Fs))

    def norms(self, p):
        self.const(p + "attn_norm.weight", np.ones(self.D, dtype=np.float32))
        self.const(p + "post_attention_norm.weight", np.ones(self.D, dtype=np.float32))

    def attention(self, p):
        d = self.dims
        D, hd, nh, nkv = self.D, d["head_dim"], d["n_head"], d["n_head_kv"]
        s = 1.0 / math.sqrt(D)
        self.rand(p + "attn_q.weight", (2 * nh * hd, D), s)
        self.rand(p + "attn_k.weight", (nkv * hd, D), s)
        self.rand(p + "attn_v.weight", (nkv * hd, D), s)
        self.const(p + "attn_q_norm.weight", np.ones(hd, dtype=np.float32))
        self.const(p + "attn_k_norm.weight", np.ones(hd, dtype=np.float32))
        # attention output ~ N(0,1)-ish values times sigmoid gate (~0.5)
        self.into_scratch(p + "attn_output.weight", nh * hd, 0.5 * math.sqrt(nh * hd))

    def delta_net(self, p):
        d = self.dims
        D, ds, ng, nv, dc = self.D, d["ssm_d_state"], d["ssm_n_group"], d["ssm_n_v_heads"], d["ssm_d_conv"]
        key_dim, value_dim = ds * ng, ds * nv
        conv_dim = 2 * key_dim + value_dim
        s = 1.0 / math.sqrt(D)
        self.rand(p + "attn_qkv.weight", (conv_dim, D), s)
        self.rand(p + "attn_gate.weight", (value_dim, D), s)
        self.rand(p + "ssm_conv1d.weight", (conv_dim, dc), 1.0 / math.sqrt(dc), force_f32=True)
        self.add(p + "ssm_dt.bias", (nv,), lambda: self.rng.uniform(-0.5, 0.5, nv).astype(np.float32))
        # converter stores -exp(A_log)
        self.add(p + "ssm_a", (nv,), lambda: -self.rng.uniform(0.5, 4.0, nv).astype(np.float32))
        self.rand(p + "ssm_beta.weight", (nv, D), s)
        self.rand(p + "ssm_alpha.weight", (nv, D), s)
        self.const(p + "ssm_norm.weight", np.ones(ds, dtype=np.float32))
        # rms-normed output gated by silu(z), rms ~0.6
        self.into_scratch(p + "ssm_out.weight", value_dim, 0.6 * math.sqrt(value_dim))

    def head(self, name, des: _Design, col: Callable[[int], Dict[int, float]], n_dirs: int):
        """A vocabulary head: -floor in the bias column plus the design's columns."""
        def make():
            out = np.zeros((des.n_vocab, self.D), dtype=np.float32)
            out[:, self.bias] = -des.floor
            for d in range(n_dirs):
                for t, v in col(d).items():
                    out[t, d] += v
            return out
        self.add(name, (des.n_vocab, self.D), make)

    def model(self, des: _Design, recurrent: List[bool], mtp: bool, mtp_head: str, vocab_n: int):
        """Every tensor of the model, in file order."""
        D, W = self.D, self.W

        def embd():
            member_idx = np.arange(vocab_n) % W
            member_idx[des.ids] = np.arange(W)
            emb = np.zeros((vocab_n, D), dtype=np.float32)
            emb[np.arange(vocab_n), member_idx] = 1.0
            emb[:, self.bias] = 1.0
            return emb
        self.add("token_embd.weight", (vocab_n, D), embd)
        head_norm = np.full(D, math.sqrt(2.0 / D), dtype=np.float32)
        self.const("output_norm.weight", head_norm)
        self.head("output.weight", des, des.target_col, W + 1)

        n_trunk = len(recurrent)
        for il in range(n_trunk):
            p = f"blk.{il}."
            self.norms(p)
            if recurrent[il]:
                self.delta_net(p)
            else:
                self.attention(p)
            self.ffn(p)
        if not mtp:
            return
        p = f"blk.{n_trunk}."
        self.norms(p)
        self.attention(p)
        self.ffn(p)
        self.const(p + "nextn.enorm.weight", head_norm)
        self.const(p + "nextn.hnorm.weight", np.ones(D, dtype=np.float32))

        def eh_proj():
            eh = np.zeros((D, 2 * D), dtype=np.float32)
            for j in range(W):
                for d, c in des.mix[j].items():
                    eh[d, j] = c
            eh[self.bias, self.bias] = 1.0
            # hidden-state half (and embedding scratch) only feeds scratch dims
            eh[self.scratch, :] = self.randn((len(self.scratch), 2 * D), _TRUNK_NOISE / math.sqrt(len(self.scratch) * D))
            eh[self.scratch, :W] = 0.0
            eh[self.scratch, self.bias] = 0.0
            return eh
        # unsure shared-head mixes are exact only in f32
        self.add(p + "nextn.eh_proj.weight", (D, 2 * D), eh_proj, force_f32=des.head_scale != 1.0)
        self.const(p + "nextn.shared_head_norm.weight", head_norm * np.float32(des.head_scale))
        if mtp_head == "own":
            self.head(p + "nextn.shared_head_head.weight", des, des._mtp_col, W)

    @property
    def n_params(self) -> int:
        return int(sum(int(np.prod(s)) for _, s, _, _ in self.specs))


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------

@dataclass
class _FileSpec:
    """One GGUF file of a model: which tensors, which block layout."""
    path: Path
    keep: Callable[[str], bool]
    block_count: int
    nextn: int                      # nextn_predict_layers (0: key not written)
    role: Optional[str]             # None (combined), "trunk" or "mtp" (sidecar layout)


def _sidecar_path(path: Path) -> Path:
    """Upstream's name of the MTP sidecar of ``path``: ``mtp-<name>`` next to it."""
    path = Path(path)
    return path.with_name(_SIDECAR_PREFIX + path.name)


def _file_specs(path: Path, n_trunk: int, mtp: bool, layout: str) -> List[_FileSpec]:
    mtp_blk = f"blk.{n_trunk}."
    if layout == "combined":
        return [_FileSpec(path, lambda n: True, n_trunk + (1 if mtp else 0), 1 if mtp else 0, None)]
    return [_FileSpec(path, lambda n: not n.startswith(mtp_blk), n_trunk, 0, "trunk"),
            _FileSpec(_sidecar_path(path), lambda n: n.startswith(mtp_blk) or not n.startswith("blk."),
                      n_trunk + 1, 1, "mtp")]


def _write_header(w, spec: _FileSpec, arch: str, dims, recurrent, interval, dtype, meta: List[tuple], voc,
                  chat_template):
    import gguf
    for key, val, vtype, sub in meta:
        w.add_key_value(key, val, vtype, sub_type=sub)
    if spec.role is not None:
        w.add_string(f"{_KEY}.file", spec.role)
    hd = dims["head_dim"]
    n_rot = hd // 4
    half = n_rot // 2
    s0 = max(1, round(half * 11 / 32))
    s1 = max(0, min(round(half * 11 / 32), half - s0))
    sections = [s0, s1, half - s0 - s1, 0]
    n_trunk = len(recurrent)

    w.add_name("mtp-cy-synthetic")
    w.add_type("model")
    w.add_context_length(dims["n_ctx_train"])
    w.add_embedding_length(dims["n_embd"])
    w.add_block_count(spec.block_count)
    if arch == "qwen35moe":
        w.add_expert_count(dims["n_expert"])
        w.add_expert_used_count(dims["n_expert_used"])
        w.add_expert_feed_forward_length(dims["expert_ff"])
        w.add_expert_shared_feed_forward_length(dims["shared_expert_ff"])
    else:
        w.add_feed_forward_length(dims["n_ff"])
    w.add_head_count(dims["n_head"])
    w.add_head_count_kv(dims["n_head_kv"])
    w.add_rope_freq_base(10_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_ssm_conv_kernel(dims["ssm_d_conv"])
    w.add_ssm_state_size(dims["ssm_d_state"])
    w.add_ssm_group_count(dims["ssm_n_group"])
    w.add_ssm_time_step_rank(dims["ssm_n_v_heads"])
    w.add_ssm_inner_size(dims["ssm_d_state"] * dims["ssm_n_v_heads"])
    w.add_array(f"{arch}.attention.recurrent_layers", recurrent + [False] * (spec.block_count - n_trunk))
    w.add_full_attention_interval(interval)
    w.add_rope_dimension_count(n_rot)
    w.add_rope_dimension_sections(sections)
    if spec.nextn:
        w.add_nextn_predict_layers(spec.nextn)

    for key, val, vtype, sub in voc.fields:
        if key == "tokenizer.chat_template" and chat_template is not None:
            continue
        w.add_key_value(key, val, vtype, sub_type=sub)
    if isinstance(chat_template, str):
        w.add_string("tokenizer.chat_template", chat_template)


def _write_files(specs: List[_FileSpec], b: _Builder, header: Callable[[Any, _FileSpec], None], arch: str):
    """Write every file of ``specs`` at once, generating each tensor once, in file order."""
    import gguf
    writers, tmps = [], []
    try:
        for spec in specs:
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = spec.path.with_name(spec.path.name + f".tmp{os.getpid()}")
            tmps.append(tmp)
            w = gguf.GGUFWriter(str(tmp), arch)
            writers.append(w)
            header(w, spec)
            for name, shape, dt, _ in b.specs:
                if spec.keep(name):
                    w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        for t in b.specs:
            wanted = [w for w, spec in zip(writers, specs) if spec.keep(t[0])]
            arr = b.materialize(t)
            for w in wanted:
                w.write_tensor_data(arr)
            del arr
        for w in writers:
            w.close()
        for tmp, spec in zip(tmps, specs):
            os.replace(tmp, spec.path)
    except BaseException:
        for w in writers:
            try:
                w.close()
            except Exception:
                pass
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()
        raise


# --------------------------------------------------------------------------
# quantization (upstream's llama-quantize)
# --------------------------------------------------------------------------

def _quantize_program() -> Path:
    """Upstream's ``llama-quantize``: ``$MTP_CY_LLAMA_QUANTIZE``, ``$MTP_CY_UPSTREAM_BIN/``,
    else built on demand in a source checkout's native build tree
    (``vendor/native_build.upstream_program``), else ``llama-quantize`` on PATH."""
    env = os.environ.get("MTP_CY_LLAMA_QUANTIZE")
    if env:
        if not Path(env).is_file():
            raise RuntimeError(f"MTP_CY_LLAMA_QUANTIZE={env} is not a file")
        return Path(env)
    d = os.environ.get("MTP_CY_UPSTREAM_BIN")
    if d and (Path(d) / "llama-quantize").is_file():
        return Path(d) / "llama-quantize"
    nb = _repo_root() / "vendor" / "native_build.py"
    if nb.is_file():
        import importlib.util
        spec = importlib.util.spec_from_file_location("_mtp_cy_native_build", nb)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        p = mod.upstream_program("llama-quantize", _repo_root())
        if p is not None:
            return Path(p)
    which = shutil.which("llama-quantize")
    if which:
        return Path(which)
    raise RuntimeError("quantized synthetic models need upstream's llama-quantize: set "
                       "MTP_CY_LLAMA_QUANTIZE (or MTP_CY_UPSTREAM_BIN) or use a source checkout "
                       "with a native build tree (build/native)")


def _keep_types(m: "SyntheticModel") -> List[str]:
    """llama-quantize options that keep the tensors carrying a draft_confidence design in
    their source types: its small logit gaps (ln(c/(1-c)), 0.08..4.6) do not survive the
    K-quants' errors (up to ~0.3 on the heads' +-20 entries, more through the shared head's
    combinations), while the default design's margin of 2 does."""
    if m.draft_confidence is None:
        return []
    if m.mtp_head == "own":
        return ["--tensor-type", "shared_head_head=f16"]
    return ["--output-tensor-type", "f16", "--tensor-type", "eh_proj=f32"]


def _run_quantize(src: Path, dst: Path, qtype: str, options: Sequence[str] = ()):
    exe = _quantize_program()
    threads = os.environ.get("MTP_CY_JOBS") or str(os.cpu_count() or 1)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    try:
        p = subprocess.run([str(exe), *options, str(src), str(tmp), qtype, threads], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
        if p.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"llama-quantize {src.name} {qtype} failed (rc {p.returncode}):\n"
                               + (p.stdout + p.stderr)[-3000:])
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def quantize(src, dst, dtype: str) -> SyntheticModel:
    """Quantize the f16/f32 synthetic model ``src`` into ``dst`` with upstream's
    ``llama-quantize`` (``dtype``: ``"q8_0"`` or ``"q4_k_m"``) and return its
    :class:`SyntheticModel` (``src``'s oracle; ``dtype`` is the new file type).

    ``src`` is a path or a :class:`SyntheticModel`; a sidecar layout is quantized
    file by file (``dst`` is the new trunk, its sidecar ``mtp-<dst name>``).
    llama-quantize copies all metadata, so :func:`load_oracle` works on the result.
    With ``draft_confidence`` the MTP head's precision-critical tensors keep their
    types (own head: ``nextn.shared_head_head`` f16; shared head: the MTP file's
    ``output.weight`` f16 and ``nextn.eh_proj`` f32), so that the drafts and their
    probabilities stay exact.
    """
    if dtype not in _QUANT_TYPES:
        raise ValueError(f"dtype must be one of {list(_QUANT_TYPES)}, got {dtype!r}")
    m = src if isinstance(src, SyntheticModel) else load_oracle(src)
    if m.dtype not in ("f16", "f32"):
        raise ValueError(f"{m.path} is already quantized ({m.dtype}); quantize the f16 file")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    qtype = _QUANT_TYPES[dtype][0]
    keep = _keep_types(m)
    if m.mtp_path is not None:
        _run_quantize(m.mtp_path, _sidecar_path(dst), qtype, keep)
        keep = []                       # the trunk's output head is the target's only
    _run_quantize(m.path, dst, qtype, keep)
    return load_oracle(dst)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------

def preset_cost(preset: str) -> DraftCost:
    """Parameter counts (:class:`DraftCost`) of a :data:`PRESETS` model without generating it."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    n_vocab = _load_vocab(find_vocab(p["vocab"])).n_vocab
    recurrent = _recurrent_pattern(p["n_trunk"], p["full_attention_interval"])
    dims = _resolve_dims(p["size"], recurrent, True, p["mtp_head"], n_vocab, p["arch"])
    tgt, dft = _step_params(dims, p["arch"], recurrent, p["mtp_head"], n_vocab)
    return DraftCost(target_params=tgt, draft_params=dft,
                     total_params=_count_params(dims, recurrent, True, p["mtp_head"], n_vocab, p["arch"]))


class _Default:
    """A default of make_model that a preset replaces (so that an explicit value, even one
    equal to the default, can be told apart and checked against the preset)."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)


def _apply_preset(preset, args: Dict[str, Any]) -> Dict[str, Any]:
    """Unwrap the defaults of ``args``; with a preset, its fixed arguments replace them (an
    explicit value must equal the preset's)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    out = {}
    for k, v in args.items():
        explicit = not isinstance(v, _Default)
        v = v if explicit else v.value
        if preset is not None and k in _PRESET_ARGS:
            want = PRESETS[preset][k]
            if explicit and v != want:
                raise ValueError(f"preset {preset!r} fixes {k}={want!r}; do not pass {k}={v!r} with it")
            v = want
        out[k] = v
    return out


def make_model(path, *, mtp=True, acceptance=0.75, n_trunk=_Default(4), full_attention_interval=_Default(4),
               size=_Default("tiny"), vocab=_Default("gpt-2"), mtp_head=_Default("own"), eog_after=None,
               dtype="f16", seed=0, vocab_path=None, chat_template=None, arch=_Default("qwen35"),
               layout="combined", draft_confidence=None, spread=None, preset=None) -> SyntheticModel:
    """Write a synthetic ``qwen35`` / ``qwen35moe`` GGUF to ``path`` and return its :class:`SyntheticModel`.

    See the module docstring for the construction and ``docs/synthetic.md`` for a guide.  Arguments:

    * ``mtp``: append one MTP/NextN block (``block_count = n_trunk + 1``,
      ``nextn_predict_layers = 1``); ``False`` writes the plain trunk model.
    * ``acceptance``: fraction of S on which the draft agrees with the target;
      exactly ``round(acceptance * |S|)`` members, chosen by ``seed``.
    * ``n_trunk`` (>= 2) and ``full_attention_interval`` (2..n_trunk): layer
      ``i`` is full attention iff ``(i + 1) % interval == 0``, the rest are
      Gated-DeltaNet layers.
    * ``arch``: ``"qwen35"`` (dense FFNs) or ``"qwen35moe"`` (routed experts plus a
      gated shared expert in every layer and in the MTP block).
    * ``size``: ``"tiny"``, ``"bench"`` (>= 200M parameters) or a dict
      overriding any of the tiny dims (``n_embd``, ``n_head``, ``n_head_kv``,
      ``head_dim``, ``ssm_d_state``, ``ssm_n_group``, ``ssm_n_v_heads``,
      ``ssm_d_conv``, ``n_words``, ``n_ctx_train``, and ``n_ff`` for qwen35 or
      ``n_expert``, ``n_expert_used``, ``expert_ff``, ``shared_expert_ff`` for
      qwen35moe; tiny MoE: 8 experts of width 64, 2 used, shared expert 128).
    * ``vocab``: ``ggml-vocab-<vocab>.gguf`` to copy the tokenizer from
      (``"gpt-2"`` or ``"qwen35"``), see :func:`find_vocab`; or ``vocab_path``.
    * ``mtp_head``: ``"own"`` (``nextn.shared_head_head``) or ``"shared"``
      (the MTP block reuses ``output.weight``, like real Qwen3.5).
    * ``eog_after``: a word of S (``"sea"`` / ``" sea"``), an index into S or
      a token id of S; its greedy successor becomes the EOG token.
    * ``dtype``: ``"f16"`` or ``"f32"`` for the matrices (norms etc. stay f32), or
      ``"q8_0"`` / ``"q4_k_m"``: the f16 file quantized by upstream's
      ``llama-quantize`` (:func:`quantize`; needs the program, see there).
    * ``layout``: ``"combined"`` (one file) or ``"sidecar"``: ``path`` gets the
      trunk only and ``mtp-<name>`` next to it the MTP block (``.mtp_path``).
    * ``draft_confidence``: ``None`` or 0.52..0.99: the MTP head gives its wrong
      drafts that probability (the target's word the runner-up) and its right
      ones ~1 (:meth:`SyntheticModel.draft_prob`, ``predict(p_min=...)``).
    * ``spread``: ``None`` or 2..8: the target gives every member ``spread``
      plausible successors (the greedy one, and the others 0.5, 1.0, ... logits
      below it), and an own MTP head gives the same candidates gaps of its own
      (0.25..2.5 below its draft): a model for sampling at temperature > 0, where
      the head's distribution differs from the target's (speculative sampling).
      Greedy behaviour and the oracle are unchanged in kind.
    * ``preset``: a name of :data:`PRESETS` (benchmark shapes); it fixes
      ``arch``, ``size``, ``n_trunk``, ``full_attention_interval``, ``mtp_head``
      and ``vocab``.
    * ``chat_template``: ``None`` keeps the vocabulary file's own
      ``tokenizer.chat_template`` if it has one (``ggml-vocab-qwen35.gguf`` and
      ``ggml-vocab-qwen2.gguf`` carry a ChatML template, ``gpt-2`` has none);
      ``False`` drops it; a ``str`` (Jinja source) is written as
      ``tokenizer.chat_template`` instead.
    """
    args = dict(mtp=mtp, acceptance=acceptance, n_trunk=n_trunk, full_attention_interval=full_attention_interval,
                size=size, vocab=vocab, mtp_head=mtp_head, eog_after=eog_after, dtype=dtype, seed=seed,
                vocab_path=vocab_path, chat_template=chat_template, arch=arch, layout=layout,
                draft_confidence=draft_confidence, spread=spread)
    args = _apply_preset(preset, args)
    _validate(args["mtp"], args["acceptance"], args["n_trunk"], args["full_attention_interval"], args["mtp_head"],
              args["dtype"], args["seed"], args["arch"], args["layout"], args["draft_confidence"], args["spread"])
    if not (chat_template is None or chat_template is False
            or (isinstance(chat_template, str) and chat_template)):
        raise ValueError("chat_template must be None (keep the vocabulary's), False (drop it) "
                         f"or a non-empty Jinja template str, got {chat_template!r:.60}")
    path = Path(path)
    if args["dtype"] in _QUANT_TYPES:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synthetic-f16-") as tmp:
            src = _generate(Path(tmp) / path.name, dict(args, dtype="f16"), preset)
            return quantize(src, path, args["dtype"])
    return _generate(path, args, preset)


_MAKE_DEFAULTS = {p.name: p.default.value if isinstance(p.default, _Default) else p.default
                  for p in inspect.signature(make_model).parameters.values() if p.name != "path"}


def _generate(path: Path, a: Dict[str, Any], preset: Optional[str],
              files: Optional[List[_FileSpec]] = None) -> SyntheticModel:
    """Generate the f16/f32 model described by the validated arguments ``a``."""
    import gguf

    vpath = find_vocab(a["vocab"], a["vocab_path"])
    voc = _load_vocab(vpath)
    n_vocab = voc.n_vocab
    interval = int(a["full_attention_interval"])
    n_trunk = int(a["n_trunk"])
    mtp, mtp_head, arch = a["mtp"], a["mtp_head"], a["arch"]
    recurrent = _recurrent_pattern(n_trunk, interval)
    dims = _resolve_dims(a["size"], recurrent, mtp, mtp_head, n_vocab, arch)
    assert _ALLOW_DEGENERATE_PATTERN or (any(recurrent) and not all(recurrent))

    des = _Design(voc, dims["n_words"], a["seed"], a["acceptance"], a["eog_after"], mtp, mtp_head,
                  a["draft_confidence"], a.get("spread"))
    draft_p = [des.draft_p(j) for j in range(des.W)] if mtp else []

    b = _Builder(dims, np.random.default_rng([int(a["seed"]), 0x3E1647]), a["dtype"], arch)
    b.model(des, recurrent, mtp, mtp_head, n_vocab)
    n_params = b.n_params
    assert n_params == _count_params(dims, recurrent, mtp, mtp_head, n_vocab, arch), "parameter count mismatch"

    size_desc = a["size"] if isinstance(a["size"], str) else dict(a["size"])
    conf = a["draft_confidence"]
    config = dict(
        generator_version=GENERATOR_VERSION, mtp=mtp, acceptance=float(a["acceptance"]), n_trunk=n_trunk,
        full_attention_interval=interval, size=size_desc, vocab=a["vocab"], vocab_file=vpath.name,
        mtp_head=mtp_head, eog_after=des.eog_after, dtype=a["dtype"], seed=int(a["seed"]), dims=dims,
        n_vocab=n_vocab, n_params=n_params, eog_token_id=des.eog_tok, recurrent_layers=recurrent,
        outside_rule="token id mod n_words", logit_floor=_LOGIT_FLOOR, logit_floor_s=_LOGIT_FLOOR_S,
        logit_floor_eog=_LOGIT_FLOOR_EOG, runner_gap=_RUNNER_GAP, arch=arch, layout=a["layout"],
        draft_confidence=None if conf is None else float(conf), preset=preset, draft_top_k=_DRAFT_TOP_K,
    )
    if a.get("spread") is not None:
        config["spread"] = int(a["spread"])
    GT = gguf.GGUFValueType
    ids = des.ids
    meta = [(f"{_KEY}.version", GENERATOR_VERSION, GT.UINT32, None),
            (f"{_KEY}.config", json.dumps(config, sort_keys=True), GT.STRING, None),
            (f"{_KEY}.words", list(des.words), GT.ARRAY, GT.STRING),
            (f"{_KEY}.token_ids", list(ids), GT.ARRAY, GT.INT32),
            (f"{_KEY}.f", [des.f[t] for t in ids], GT.ARRAY, GT.INT32),
            (f"{_KEY}.runner_up", [des.runner_up[t] for t in ids], GT.ARRAY, GT.INT32)]
    if mtp:
        meta += [(f"{_KEY}.g", [des.g[t] for t in ids], GT.ARRAY, GT.INT32),
                 (f"{_KEY}.draft_p", draft_p, GT.ARRAY, GT.FLOAT64)]
    meta += [(f"{_KEY}.eog_token_id", des.eog_tok, GT.INT32, None),
             (f"{_KEY}.eog_after", -1 if des.eog_after is None else des.eog_after, GT.INT32, None)]

    specs = files if files is not None else _file_specs(path, n_trunk, mtp, a["layout"])
    _write_files(specs, b, lambda w, spec: _write_header(w, spec, arch, dims, recurrent, interval, a["dtype"],
                                                          meta, voc, a["chat_template"]), arch)
    mtp_path = _sidecar_path(path) if a["layout"] == "sidecar" else None
    return _from_config(path, config, des.words, ids, des.f, des.g if mtp else {}, des.runner_up,
                        dict(zip(ids, draft_p)), mtp_path=mtp_path)


def _from_config(path, config, words, ids, f, g, runner_up, draft_p, mtp_path=None, dtype=None) -> SyntheticModel:
    return SyntheticModel(
        path=Path(path), words=list(words), token_ids=[int(t) for t in ids],
        f={int(k): int(v) for k, v in f.items()}, g={int(k): int(v) for k, v in g.items()},
        runner_up={int(k): int(v) for k, v in runner_up.items()},
        eog_token_id=int(config["eog_token_id"]),
        eog_after=None if config["eog_after"] is None else int(config["eog_after"]),
        mtp=bool(config["mtp"]), mtp_head=config["mtp_head"], acceptance=float(config["acceptance"]),
        n_trunk=int(config["n_trunk"]), full_attention_interval=int(config["full_attention_interval"]),
        vocab=config["vocab"], dtype=dtype or config["dtype"], size=config["size"], seed=int(config["seed"]),
        dims=dict(config["dims"]), n_vocab=int(config["n_vocab"]), n_params=int(config["n_params"]),
        recurrent_layers=list(config["recurrent_layers"]),
        generator_version=int(config["generator_version"]), arch=config.get("arch", "qwen35"),
        layout=config.get("layout", "combined"), mtp_path=None if mtp_path is None else Path(mtp_path),
        draft_confidence=config.get("draft_confidence"), preset=config.get("preset"),
        spread=config.get("spread"), draft_p={int(k): float(v) for k, v in draft_p.items()}, config=dict(config),
    )


def load_oracle(path) -> SyntheticModel:
    """Rebuild the :class:`SyntheticModel` of a file written by :func:`make_model` (or
    :func:`quantize`).  For a sidecar layout, either file (the trunk ``X`` or its
    sidecar ``mtp-X``) gives the model whose ``path`` is the trunk and ``mtp_path`` the
    sidecar."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    ft_key = "general.file_type"
    kv = _read_gguf_kv(path, want=lambda k: k.startswith(_KEY + ".") or k == ft_key,
                       until=lambda found: ft_key in found and f"{_KEY}.eog_after" in found)

    def get(name, required=True):
        item = kv.get(f"{_KEY}.{name}")
        if item is None:
            if required:
                raise ValueError(f"{path}: not a mtp_cy synthetic model (missing {_KEY}.{name})")
            return None
        return item[0]

    config = json.loads(get("config"))
    words = list(get("words"))
    ids = [int(x) for x in get("token_ids")]
    f = dict(zip(ids, (int(x) for x in get("f"))))
    runner_up = dict(zip(ids, (int(x) for x in get("runner_up"))))
    gv = get("g", required=False)
    g = dict(zip(ids, (int(x) for x in gv))) if gv is not None else {}
    pv = get("draft_p", required=False)
    draft_p = dict(zip(ids, (float(x) for x in pv))) if pv is not None else {}
    role = get("file", required=False)
    mtp_path = None
    if role == "trunk":
        mtp_path = _sidecar_path(path)
    elif role == "mtp":
        mtp_path = path
        name = path.name[len(_SIDECAR_PREFIX):] if path.name.startswith(_SIDECAR_PREFIX) else path.name
        path = path.with_name(name)
    ft = kv.get(ft_key)
    dtype = _FILE_TYPES.get(int(ft[0]), f"ftype{int(ft[0])}") if ft is not None else None
    return _from_config(path, config, words, ids, f, g, runner_up, draft_p, mtp_path=mtp_path, dtype=dtype)


_MAKE_PARAMS = [p for p in inspect.signature(make_model).parameters.values() if p.name != "path"]
#: new arguments dropped from the cache key at their defaults, so that the file names of
#: every model generated before they existed stay as they were
_KEY_DROP_AT_DEFAULT = ("chat_template", "arch", "layout", "draft_confidence", "spread", "preset")


def _cache_key(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    names = {p.name for p in _MAKE_PARAMS}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"cached_model() got unexpected keyword arguments {sorted(unknown)}")
    full = _apply_preset(kwargs.get("preset"), {p.name: kwargs.get(p.name, p.default) for p in _MAKE_PARAMS})
    if full.get("vocab_path") is not None:
        full["vocab_path"] = str(Path(full["vocab_path"]).resolve())
    for k in _KEY_DROP_AT_DEFAULT:
        if full.get(k) is None or full[k] == _MAKE_DEFAULTS[k]:
            del full[k]
    for k in ("acceptance", "draft_confidence"):
        if isinstance(full.get(k), (int, float)) and not isinstance(full[k], bool):
            full[k] = float(full[k])
    return full


def cached_model(**kwargs) -> SyntheticModel:
    """:func:`make_model` into :func:`cache_dir`, reusing an existing file with the same arguments.

    The file name is a hash of the (defaults-completed) arguments and
    :data:`GENERATOR_VERSION` (``chat_template``, ``arch``, ``layout``,
    ``draft_confidence`` and ``preset`` are part of it whenever they are not at
    their defaults).  A quantized ``dtype`` quantizes the cached f16 model (which
    stays cached too).  A sidecar layout's sidecar is ``mtp-<file name>``.
    """
    full = _cache_key(kwargs)
    blob = json.dumps({"v": GENERATOR_VERSION, "kw": full}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    d = cache_dir()
    path = d / f"synthetic-{digest}.gguf"
    if path.is_file():
        try:
            m = load_oracle(path)
            if m.generator_version == GENERATOR_VERSION and all(p.is_file() for p in m.files):
                return m
        except Exception:
            pass
    d.mkdir(parents=True, exist_ok=True)
    if full["dtype"] in _QUANT_TYPES:
        src = cached_model(**dict(kwargs, dtype="f16"))
        return quantize(src, path, full["dtype"])
    return make_model(path, **full)


#: what :func:`mismatched_sidecar` can get wrong
MISMATCH_KINDS = ("arch", "n_embd", "n_vocab", "no_nextn")


def mismatched_sidecar(model: SyntheticModel, kind: str, path=None) -> Path:
    """Write an MTP sidecar that does *not* fit ``model`` (for negative tests) and return its path.

    ``kind``: ``"arch"`` (the other of qwen35 / qwen35moe), ``"n_embd"`` (``n_embd + 32``),
    ``"n_vocab"`` (the other vocabulary: gpt-2 <-> qwen35), each otherwise a proper
    sidecar of the same settings; ``"no_nextn"``: a file with ``token_embd``,
    ``output_norm`` and ``output`` of ``model``'s settings but no NextN block
    (``block_count = n_trunk``, no ``nextn_predict_layers``).  ``path`` defaults to
    ``mtp-<kind>-<model file name>`` next to ``model.path``.  The file carries the
    generator's metadata of the settings it was made from.
    """
    if kind not in MISMATCH_KINDS:
        raise ValueError(f"kind must be one of {list(MISMATCH_KINDS)}, got {kind!r}")
    if not model.mtp:
        raise ValueError(f"{model.path} has no MTP block")
    path = Path(path) if path is not None else model.path.with_name(f"{_SIDECAR_PREFIX}{kind}-{model.path.name}")
    a = dict(_MAKE_DEFAULTS, mtp=True, acceptance=model.acceptance, n_trunk=model.n_trunk,
             full_attention_interval=model.full_attention_interval, mtp_head=model.mtp_head,
             eog_after=model.eog_after, dtype="f16" if model.dtype not in ("f16", "f32") else model.dtype,
             seed=model.seed, vocab=model.vocab, arch=model.arch, layout="sidecar",
             draft_confidence=model.draft_confidence, spread=model.spread)
    dims = dict(model.dims)
    if kind == "arch":
        a["arch"] = "qwen35" if model.arch == "qwen35moe" else "qwen35moe"
        common = {k: v for k, v in dims.items() if k in _DIM_KEYS and k != "n_ff"}
        dims = dict(common, n_ff=SIZES["tiny"]["n_ff"]) if a["arch"] == "qwen35" \
            else dict(common, **_MOE_SIZES["tiny"])
    elif kind == "n_embd":
        dims["n_embd"] += 32
    elif kind == "n_vocab":
        a["vocab"] = "qwen35" if model.vocab != "qwen35" else "gpt-2"
        if a["eog_after"] is not None:
            a["eog_after"] = model.token_ids.index(model.eog_after)
    a["size"] = dims
    _validate(a["mtp"], a["acceptance"], a["n_trunk"], a["full_attention_interval"], a["mtp_head"], a["dtype"],
              a["seed"], a["arch"], a["layout"], a["draft_confidence"], a["spread"])
    files = None
    if kind == "no_nextn":
        files = [_FileSpec(path, lambda n: not n.startswith("blk."), model.n_trunk, 0, "mtp")]
        _generate(path.with_name(path.name + ".unused"), a, None, files=files)
    else:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".sidecar-") as tmp:
            m = _generate(Path(tmp) / "trunk.gguf", a, None)
            os.replace(m.mtp_path, path)
    return path
