"""Synthetic ``qwen35`` GGUF models whose every prediction is known in advance.

This module writes small (or, on request, benchmark-sized) GGUF files of
llama.cpp's ``qwen35`` architecture (Qwen3.5 dense: a hybrid trunk of
Gated-DeltaNet recurrent layers with a full-attention layer every
``full_attention_interval`` layers) plus one MTP ("NextN") block, using
numpy and the ``gguf`` writer only.  The weights are *designed*, not trained,
so that

* the target model's greedy next token is a fixed function ``f`` of the
  current token alone, and
* the MTP head's draft is a fixed function ``g`` of the token it is fed,

and a pure-Python oracle (:meth:`SyntheticModel.predict`) can reproduce the
exact greedy continuation *and* the exact speculative-decoding counters of
both upstream's ``llama-speculative-simple --spec-type draft-mtp`` and
mtp_cy's own loop.

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
beta/conv, FFN gate/up) is a random Gaussian, so the attention, the
Gated-DeltaNet recurrence, the convolution state and the FFN really run on
non-trivial data.  Every projection *out of* a layer back into the residual
stream (``attn_output``, ``ssm_out``, ``ffn_down``) has zero rows except for
the scratch dimensions, with tiny random values there (outputs of norm
~1e-2).  Hence the token direction and the bias dimension of the residual
stream are carried through the whole trunk *bit-exactly*
(``x + 0 == x``), and the final hidden state is
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
block's own attention/FFN again only write scratch dimensions.

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

``g(t) = f(t)`` for exactly ``round(acceptance * W)`` members (chosen by
``seed``) and ``g(t)`` is another member of ``S`` (``!= f(t)``) for the
rest.  MTP drafting is a chain: ``d1 = g(last)``, ``d2 = g(d1)``, ...;
verification accepts ``d_i`` while ``d_i == f(previous)`` and then appends
``f(last accepted)``.  All of this is computed by :meth:`SyntheticModel.predict`.

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
``--spec-draft-n-max`` tokens and ``common_speculative_draft`` only
truncates when the per-call limit is > 0, so a limit of 0 yields a *full*
draft; verification (``common_sampler_sample_and_accept_n``) also stops
after an accepted EOG that is not the last draft token; ``n_drafted +=
len(draft)``, ``n_accept += len(ids) - 1``, ``n_predict += len(ids)``, and the
loop ends only once ``n_predict > N`` or on EOG (so it may print up to
``N + n_draft + 1`` tokens).  The draft head's own sampler (top-k 10, no
temperature) takes the most probable candidate, i.e. the argmax.  For
qwen35 the target context gets ``n_rs_seq = n_draft`` (recurrent-state
rollback), so the checkpoint path of speculative-simple never runs.

Everything the oracle needs (words, ids, ``f``, ``g``, runner-ups, EOG,
settings) is stored in the GGUF itself under ``mtp_cy.synthetic.*`` so that
:func:`load_oracle` rebuilds the :class:`SyntheticModel` from any generated
file.  :func:`cached_model` generates into ``$MTP_CY_CACHE_DIR`` (default
``~/.cache/mtp_cy/models``) and reuses files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = [
    "GENERATOR_VERSION",
    "SIZES",
    "SyntheticModel",
    "Prediction",
    "make_model",
    "load_oracle",
    "cached_model",
    "find_vocab",
    "cache_dir",
    "single_token_id",
]

#: Bumped whenever the generated files (or their metadata) change.
GENERATOR_VERSION = 3

_KEY = "mtp_cy.synthetic"
_ARCH = "qwen35"

# Logit design (in units of the normalised hidden state, see module docstring)
_LOGIT_FLOOR = 40.0   # tokens outside S that are not the target
_LOGIT_FLOOR_S = 20.0  # members of S that are neither the target nor the runner-up
_LOGIT_FLOOR_EOG = 60.0  # the EOG token when it is not the target
_RUNNER_GAP = 2.0     # runner-up distance below the greedy token (target head only)
_TRUNK_NOISE = 1e-2   # norm of what one sub-layer adds to the scratch dimensions
_N_SPECIAL_DIMS = 2   # spare direction + bias dimension
_MIN_SCRATCH = 4

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


def _read_gguf_kv(path, want=None, stop_when_found=False) -> Dict[str, tuple]:
    """Read GGUF key/values as ``{key: (value, vtype, sub_type)}``.

    A small reader (much faster than ``gguf.GGUFReader`` on vocabularies):
    only keys accepted by ``want(key)`` are decoded, the others are skipped;
    with ``stop_when_found`` it returns at the first unwanted key after a
    wanted one (make_model writes its own keys as one contiguous group).
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
        return self.drafts_accepted / self.drafts_generated if self.drafts_generated else 0.0


@dataclass
class SyntheticModel:
    """Description of a generated model and its exact oracle."""

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
    config: Dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- token helpers ---------------------------------------------------

    @property
    def n_words(self) -> int:
        return len(self.token_ids)

    @property
    def pieces(self) -> Dict[int, str]:
        return dict(zip(self.token_ids, self.words))

    @property
    def accepted(self) -> List[int]:
        """Members of S on which the MTP draft agrees with the target (g == f)."""
        return [t for t in self.token_ids if self.g.get(t) == self.f[t]]

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

    def is_eog(self, token: int) -> bool:
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

    def _chain(self, last: int, n: int) -> List[int]:
        out = []
        for _ in range(n):
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
                rules: str = "mtp_cy", n_ctx: int = 2048) -> Prediction:
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
        --spec-draft-n-max n_draft -n max_tokens -c n_ctx --temp 0``.
        """
        if not self.mtp:
            raise ValueError(f"{self.path} has no MTP block; use greedy()")
        prompt = self._check_prompt(prompt_tokens)
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
        if not isinstance(n_draft, (int, np.integer)) or n_draft < 0:
            raise ValueError(f"n_draft must be an int >= 0, got {n_draft!r}")
        if rules == "mtp_cy":
            return self._predict_mtp_cy(prompt, int(max_tokens), int(n_draft), int(n_ctx))
        if rules == "upstream":
            if n_draft < 1:
                raise ValueError("rules='upstream' needs n_draft >= 1 (--spec-draft-n-max)")
            return self._predict_upstream(prompt, int(max_tokens), int(n_draft), int(n_ctx))
        raise ValueError(f"rules must be 'mtp_cy' or 'upstream', got {rules!r}")

    def _predict_mtp_cy(self, prompt: List[int], max_tokens: int, n_draft: int, n_ctx: int) -> Prediction:
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
            draft = self._chain(last, n_max) if n_max > 0 else []
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

    def _predict_upstream(self, prompt: List[int], n_predict_max: int, n_draft: int, n_ctx: int) -> Prediction:
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
            # the MTP impl always drafts its configured n_max; common_speculative_draft
            # truncates only when the per-call n_max is > 0
            draft = self._chain(id_last, n_draft)
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


def _resolve_dims(size, recurrent: List[bool], mtp: bool, mtp_head: str, n_vocab: int) -> Dict[str, int]:
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)} or a dict of dims, got {size!r}")
        dims = dict(SIZES[size])
    elif isinstance(size, Mapping):
        unknown = set(size) - set(_DIM_KEYS)
        if unknown:
            raise ValueError(f"unknown size keys {sorted(unknown)}; allowed: {list(_DIM_KEYS)}")
        dims = dict(SIZES["tiny"])
        dims.update(size)
    else:
        raise ValueError(f"size must be 'tiny', 'bench' or a dict, got {size!r}")
    auto_ff = dims["n_ff"] is None
    if auto_ff:
        dims["n_ff"] = _BENCH_MIN_FF
    for k in _DIM_KEYS:
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
    if auto_ff:
        while _count_params(dims, recurrent, mtp, mtp_head, n_vocab) < _BENCH_MIN_PARAMS:
            dims["n_ff"] += 512
    return dims


def _validate(mtp, acceptance, n_trunk, full_attention_interval, mtp_head, dtype, seed):
    if not isinstance(mtp, bool):
        raise ValueError(f"mtp must be a bool, got {mtp!r}")
    if isinstance(acceptance, bool) or not isinstance(acceptance, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(acceptance)) or not (0.0 <= float(acceptance) <= 1.0):
        raise ValueError(f"acceptance must be a number in [0, 1], got {acceptance!r}")
    if not _is_int(n_trunk) or n_trunk < 2:
        raise ValueError(f"n_trunk must be an int >= 2 (at least one recurrent and one attention layer), got {n_trunk!r}")
    if n_trunk > 256:
        raise ValueError(f"n_trunk must be <= 256, got {n_trunk}")
    if not _is_int(full_attention_interval):
        raise ValueError(f"full_attention_interval must be an int, got {full_attention_interval!r}")
    if full_attention_interval < 2:
        raise ValueError(
            f"full_attention_interval={full_attention_interval} gives a trunk without recurrent "
            "(Gated-DeltaNet) layers; the pinned llama.cpp aborts with GGML_ASSERT(buffer) on such a "
            "qwen35 model. Use an interval >= 2.")
    if full_attention_interval > n_trunk:
        raise ValueError(
            f"full_attention_interval={full_attention_interval} > n_trunk={n_trunk} gives a trunk without "
            "full-attention layers; the pinned llama.cpp aborts with GGML_ASSERT(buffer) on such a "
            "qwen35 model. Use 2 <= full_attention_interval <= n_trunk.")
    if mtp_head not in ("own", "shared"):
        raise ValueError(f"mtp_head must be 'own' or 'shared', got {mtp_head!r}")
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be 'f16' or 'f32', got {dtype!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


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
# weights
# --------------------------------------------------------------------------

def _layer_shapes(dims: Dict[str, int]):
    D, F = dims["n_embd"], dims["n_ff"]
    hd, nh, nkv = dims["head_dim"], dims["n_head"], dims["n_head_kv"]
    ds, ng, nv, dc = dims["ssm_d_state"], dims["ssm_n_group"], dims["ssm_n_v_heads"], dims["ssm_d_conv"]
    key_dim, value_dim = ds * ng, ds * nv
    conv_dim = 2 * key_dim + value_dim
    ffn = {"ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    norms = {"attn_norm": (D,), "post_attention_norm": (D,)}
    attn = {"attn_q": (2 * nh * hd, D), "attn_k": (nkv * hd, D), "attn_v": (nkv * hd, D),
            "attn_output": (D, nh * hd), "attn_q_norm": (hd,), "attn_k_norm": (hd,)}
    recr = {"attn_qkv": (conv_dim, D), "attn_gate": (value_dim, D), "ssm_conv1d": (conv_dim, dc),
            "ssm_dt": (nv,), "ssm_a": (nv,), "ssm_beta": (nv, D), "ssm_alpha": (nv, D),
            "ssm_norm": (ds,), "ssm_out": (D, value_dim)}
    return norms, attn, recr, ffn


def _count_params(dims, recurrent: List[bool], mtp, mtp_head, n_vocab) -> int:
    """Number of parameters make_model() writes for these settings."""
    D = dims["n_embd"]
    norms, attn, recr, ffn = _layer_shapes(dims)
    size = lambda d: sum(int(np.prod(s)) for s in d.values())  # noqa: E731
    n = 2 * n_vocab * D + D  # token_embd, output, output_norm
    n_recr = sum(1 for r in recurrent if r)
    n_attn = len(recurrent) - n_recr
    n += len(recurrent) * (size(norms) + size(ffn)) + n_attn * size(attn) + n_recr * size(recr)
    if mtp:
        n += size(norms) + size(ffn) + size(attn) + 2 * D * D + 3 * D
        if mtp_head == "own":
            n += n_vocab * D
    return n


def _recurrent_pattern(n_trunk: int, interval: int) -> List[bool]:
    return [(i + 1) % interval != 0 for i in range(n_trunk)]


def _single_cycle(rng, n: int) -> List[int]:
    order = [int(x) for x in rng.permutation(n)]
    nxt = [0] * n
    for k in range(n):
        nxt[order[k]] = order[(k + 1) % n]
    return nxt


class _Builder:
    def __init__(self, dims, rng, dtype):
        self.dims = dims
        self.rng = rng
        self.np_dtype = np.float16 if dtype == "f16" else np.float32
        self.tensors: List[tuple] = []
        D, W = dims["n_embd"], dims["n_words"]
        self.D, self.W = D, W
        self.spare = W
        self.bias = W + 1
        self.scratch = np.arange(W + _N_SPECIAL_DIMS, D)

    def add(self, name, arr, force_f32=False):
        arr = np.ascontiguousarray(arr, dtype=np.float32 if (force_f32 or arr.ndim <= 1) else self.np_dtype)
        if not np.all(np.isfinite(arr)):
            raise AssertionError(f"non-finite values in {name}")
        self.tensors.append((name, arr))

    def randn(self, shape, std):
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def into_scratch(self, n_in, inner_norm):
        """Output projection (D, n_in) writing only scratch dims, total output norm ~_TRUNK_NOISE."""
        n_sc = len(self.scratch)
        w = np.zeros((self.D, n_in), dtype=np.float32)
        std = _TRUNK_NOISE / (max(inner_norm, 1e-3) * math.sqrt(n_sc))
        w[self.scratch, :] = self.randn((n_sc, n_in), std)
        return w

    def ffn(self, p):
        D, F = self.D, self.dims["n_ff"]
        self.add(p + "ffn_gate.weight", self.randn((F, D), 1.0 / math.sqrt(D)))
        self.add(p + "ffn_up.weight", self.randn((F, D), 1.0 / math.sqrt(D)))
        # silu(N(0,1)) * N(0,1) has rms ~0.6
        self.add(p + "ffn_down.weight", self.into_scratch(F, 0.6 * math.sqrt(F)))

    def norms(self, p):
        self.add(p + "attn_norm.weight", np.ones(self.D))
        self.add(p + "post_attention_norm.weight", np.ones(self.D))

    def attention(self, p):
        d = self.dims
        D, hd, nh, nkv = self.D, d["head_dim"], d["n_head"], d["n_head_kv"]
        s = 1.0 / math.sqrt(D)
        self.add(p + "attn_q.weight", self.randn((2 * nh * hd, D), s))
        self.add(p + "attn_k.weight", self.randn((nkv * hd, D), s))
        self.add(p + "attn_v.weight", self.randn((nkv * hd, D), s))
        self.add(p + "attn_q_norm.weight", np.ones(hd))
        self.add(p + "attn_k_norm.weight", np.ones(hd))
        # attention output ~ N(0,1)-ish values times sigmoid gate (~0.5)
        self.add(p + "attn_output.weight", self.into_scratch(nh * hd, 0.5 * math.sqrt(nh * hd)))

    def delta_net(self, p):
        d = self.dims
        D, ds, ng, nv, dc = self.D, d["ssm_d_state"], d["ssm_n_group"], d["ssm_n_v_heads"], d["ssm_d_conv"]
        key_dim, value_dim = ds * ng, ds * nv
        conv_dim = 2 * key_dim + value_dim
        s = 1.0 / math.sqrt(D)
        self.add(p + "attn_qkv.weight", self.randn((conv_dim, D), s))
        self.add(p + "attn_gate.weight", self.randn((value_dim, D), s))
        self.add(p + "ssm_conv1d.weight", self.randn((conv_dim, dc), 1.0 / math.sqrt(dc)), force_f32=True)
        self.add(p + "ssm_dt.bias", self.rng.uniform(-0.5, 0.5, nv).astype(np.float32))
        # converter stores -exp(A_log)
        self.add(p + "ssm_a", -self.rng.uniform(0.5, 4.0, nv).astype(np.float32))
        self.add(p + "ssm_beta.weight", self.randn((nv, D), s))
        self.add(p + "ssm_alpha.weight", self.randn((nv, D), s))
        self.add(p + "ssm_norm.weight", np.ones(ds))
        # rms-normed output gated by silu(z), rms ~0.6
        self.add(p + "ssm_out.weight", self.into_scratch(value_dim, 0.6 * math.sqrt(value_dim)))


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------

def make_model(path, *, mtp=True, acceptance=0.75, n_trunk=4, full_attention_interval=4, size="tiny",
               vocab="gpt-2", mtp_head="own", eog_after=None, dtype="f16", seed=0,
               vocab_path=None, chat_template=None) -> SyntheticModel:
    """Write a synthetic ``qwen35`` GGUF to ``path`` and return its :class:`SyntheticModel`.

    See the module docstring for the construction.  Arguments:

    * ``mtp``: append one MTP/NextN block (``block_count = n_trunk + 1``,
      ``nextn_predict_layers = 1``); ``False`` writes the plain trunk model.
    * ``acceptance``: fraction of S on which the draft agrees with the target;
      exactly ``round(acceptance * |S|)`` members, chosen by ``seed``.
    * ``n_trunk`` (>= 2) and ``full_attention_interval`` (2..n_trunk): layer
      ``i`` is full attention iff ``(i + 1) % interval == 0``, the rest are
      Gated-DeltaNet layers.
    * ``size``: ``"tiny"``, ``"bench"`` (>= 200M parameters) or a dict
      overriding any of the tiny dims (``n_embd``, ``n_ff``, ``n_head``,
      ``n_head_kv``, ``head_dim``, ``ssm_d_state``, ``ssm_n_group``,
      ``ssm_n_v_heads``, ``ssm_d_conv``, ``n_words``, ``n_ctx_train``).
    * ``vocab``: ``ggml-vocab-<vocab>.gguf`` to copy the tokenizer from
      (``"gpt-2"`` or ``"qwen35"``), see :func:`find_vocab`; or ``vocab_path``.
    * ``mtp_head``: ``"own"`` (``nextn.shared_head_head``) or ``"shared"``
      (the MTP block reuses ``output.weight``, like real Qwen3.5).
    * ``eog_after``: a word of S (``"sea"`` / ``" sea"``), an index into S or
      a token id of S; its greedy successor becomes the EOG token.
    * ``dtype``: ``"f16"`` or ``"f32"`` for the matrices (norms etc. stay f32).
    * ``chat_template``: ``None`` keeps the vocabulary file's own
      ``tokenizer.chat_template`` if it has one (``ggml-vocab-qwen35.gguf`` and
      ``ggml-vocab-qwen2.gguf`` carry a ChatML template, ``gpt-2`` has none);
      ``False`` drops it; a ``str`` (Jinja source) is written as
      ``tokenizer.chat_template`` instead.
    """
    import gguf

    _validate(mtp, acceptance, n_trunk, full_attention_interval, mtp_head, dtype, seed)
    if not (chat_template is None or chat_template is False
            or (isinstance(chat_template, str) and chat_template)):
        raise ValueError("chat_template must be None (keep the vocabulary's), False (drop it) "
                         f"or a non-empty Jinja template str, got {chat_template!r:.60}")
    vpath = find_vocab(vocab, vocab_path)
    voc = _load_vocab(vpath)
    n_vocab = voc.n_vocab
    dims_in = size
    interval = int(full_attention_interval)
    n_trunk = int(n_trunk)
    recurrent = _recurrent_pattern(n_trunk, interval)
    dims = _resolve_dims(size, recurrent, mtp, mtp_head, n_vocab)
    assert any(recurrent) and not all(recurrent)

    W, D = dims["n_words"], dims["n_embd"]
    sel = _select_words(voc, W)
    words = [w for w, _ in sel]
    ids = [t for _, t in sel]
    id_index = {t: j for j, t in enumerate(ids)}
    if voc.eos_id in id_index or not (0 <= voc.eos_id < n_vocab):
        raise ValueError("vocabulary EOS token collides with the word set")
    eog_tok = voc.eos_id
    eog_after_id = _resolve_eog_after(eog_after, words, ids)

    # ---- the maps (structure rng) -------------------------------------------
    srng = np.random.default_rng([int(seed), 0x5EED])
    cyc = _single_cycle(srng, W)                         # index -> index
    f_idx: List[Optional[int]] = list(cyc)               # None = EOG
    if eog_after_id is not None:
        f_idx[id_index[eog_after_id]] = None
    # target head: direction d -> token; spare direction -> the orphaned member
    orphan = cyc[id_index[eog_after_id]] if eog_after_id is not None else cyc[0]
    dir_target = [ids[i] if i is not None else eog_tok for i in f_idx] + [ids[orphan]]
    runner = []
    for d, tgt in enumerate(dir_target):
        choices = [t for t in ids if t != tgt]
        runner.append(int(choices[int(srng.integers(len(choices)))]))
    f = {ids[j]: dir_target[j] for j in range(W)}
    runner_up = {ids[j]: runner[j] for j in range(W)}

    n_acc = int(round(float(acceptance) * W))
    acc_set = set(int(x) for x in srng.permutation(W)[:n_acc])
    g: Dict[int, int] = {}
    for j in range(W):
        if j in acc_set:
            g[ids[j]] = f[ids[j]]
        else:
            choices = [t for t in ids if t != f[ids[j]]]
            g[ids[j]] = int(choices[int(srng.integers(len(choices)))])

    # ---- tensors (weight rng) -------------------------------------------------
    b = _Builder(dims, np.random.default_rng([int(seed), 0x3E1647]), dtype)
    member_idx = np.arange(n_vocab) % W
    member_idx[ids] = np.arange(W)
    emb = np.zeros((n_vocab, D), dtype=np.float32)
    emb[np.arange(n_vocab), member_idx] = 1.0
    emb[:, b.bias] = 1.0
    b.add("token_embd.weight", emb)
    del emb
    head_norm = np.full(D, math.sqrt(2.0 / D), dtype=np.float32)
    b.add("output_norm.weight", head_norm)
    out = np.zeros((n_vocab, D), dtype=np.float32)
    floor = np.full(n_vocab, _LOGIT_FLOOR, dtype=np.float32)
    floor[ids] = _LOGIT_FLOOR_S
    floor[eog_tok] = _LOGIT_FLOOR_EOG
    out[:, b.bias] = -floor
    for d, (tgt, run) in enumerate(zip(dir_target, runner)):
        out[tgt, d] += floor[tgt]
        out[run, d] += floor[run] - _RUNNER_GAP
    b.add("output.weight", out)
    del out

    for il in range(n_trunk):
        p = f"blk.{il}."
        b.norms(p)
        if recurrent[il]:
            b.delta_net(p)
        else:
            b.attention(p)
        b.ffn(p)

    if mtp:
        il = n_trunk
        p = f"blk.{il}."
        b.norms(p)
        b.attention(p)
        b.ffn(p)
        b.add(p + "nextn.enorm.weight", head_norm)
        b.add(p + "nextn.hnorm.weight", np.ones(D))
        eh = np.zeros((D, 2 * D), dtype=np.float32)
        if mtp_head == "own":
            steer = list(range(W))
        else:
            inv = {}
            for d in reversed(range(W + 1)):
                inv[dir_target[d]] = d
            steer = [inv[g[ids[j]]] for j in range(W)]
        for j in range(W):
            eh[steer[j], j] = 1.0
        eh[b.bias, b.bias] = 1.0
        # hidden-state half (and embedding scratch) only feeds scratch dims
        eh[b.scratch, :] = b.randn((len(b.scratch), 2 * D), _TRUNK_NOISE / math.sqrt(len(b.scratch) * D))
        eh[b.scratch, :W] = 0.0
        eh[b.scratch, b.bias] = 0.0
        b.add(p + "nextn.eh_proj.weight", eh)
        b.add(p + "nextn.shared_head_norm.weight", head_norm)
        if mtp_head == "own":
            hh = np.zeros((n_vocab, D), dtype=np.float32)
            hh[:, b.bias] = -floor
            for j in range(W):
                hh[g[ids[j]], j] += floor[g[ids[j]]]
            b.add(p + "nextn.shared_head_head.weight", hh)
            del hh

    n_params = int(sum(a.size for _, a in b.tensors))
    assert n_params == _count_params(dims, recurrent, mtp, mtp_head, n_vocab), "parameter count mismatch"

    # ---- metadata ---------------------------------------------------------------
    size_desc = dims_in if isinstance(dims_in, str) else dict(dims_in)
    config = dict(
        generator_version=GENERATOR_VERSION, mtp=mtp, acceptance=float(acceptance), n_trunk=n_trunk,
        full_attention_interval=interval, size=size_desc, vocab=vocab, vocab_file=vpath.name,
        mtp_head=mtp_head, eog_after=eog_after_id, dtype=dtype, seed=int(seed), dims=dims,
        n_vocab=n_vocab, n_params=n_params, eog_token_id=eog_tok, recurrent_layers=recurrent,
        outside_rule="token id mod n_words", logit_floor=_LOGIT_FLOOR, logit_floor_s=_LOGIT_FLOOR_S,
        logit_floor_eog=_LOGIT_FLOOR_EOG, runner_gap=_RUNNER_GAP,
    )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), _ARCH)
    try:
        hd = dims["head_dim"]
        n_rot = hd // 4
        half = n_rot // 2
        s0 = max(1, round(half * 11 / 32))
        s1 = max(0, min(round(half * 11 / 32), half - s0))
        sections = [s0, s1, half - s0 - s1, 0]
        block_count = n_trunk + (1 if mtp else 0)

        GT = gguf.GGUFValueType
        w.add_uint32(f"{_KEY}.version", GENERATOR_VERSION)
        w.add_string(f"{_KEY}.config", json.dumps(config, sort_keys=True))
        w.add_key_value(f"{_KEY}.words", list(words), GT.ARRAY, sub_type=GT.STRING)
        w.add_key_value(f"{_KEY}.token_ids", list(ids), GT.ARRAY, sub_type=GT.INT32)
        w.add_key_value(f"{_KEY}.f", [f[t] for t in ids], GT.ARRAY, sub_type=GT.INT32)
        w.add_key_value(f"{_KEY}.runner_up", [runner_up[t] for t in ids], GT.ARRAY, sub_type=GT.INT32)
        if mtp:
            w.add_key_value(f"{_KEY}.g", [g[t] for t in ids], GT.ARRAY, sub_type=GT.INT32)
        w.add_int32(f"{_KEY}.eog_token_id", eog_tok)
        w.add_int32(f"{_KEY}.eog_after", -1 if eog_after_id is None else eog_after_id)

        w.add_name("mtp-cy-synthetic")
        w.add_type("model")
        w.add_context_length(dims["n_ctx_train"])
        w.add_embedding_length(D)
        w.add_block_count(block_count)
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
        w.add_array(f"{_ARCH}.attention.recurrent_layers", recurrent + [False] * (block_count - n_trunk))
        w.add_full_attention_interval(interval)
        w.add_rope_dimension_count(n_rot)
        w.add_rope_dimension_sections(sections)
        if mtp:
            w.add_nextn_predict_layers(1)

        for key, val, vtype, sub in voc.fields:
            if key == "tokenizer.chat_template" and chat_template is not None:
                continue
            w.add_key_value(key, val, vtype, sub_type=sub)
        if isinstance(chat_template, str):
            w.add_string("tokenizer.chat_template", chat_template)

        for name, arr in b.tensors:
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            w.close()
        except Exception:
            pass
        if tmp.exists():
            tmp.unlink()
        raise

    return _from_config(path, config, words, ids, f, g if mtp else {}, runner_up)


def _from_config(path, config, words, ids, f, g, runner_up) -> SyntheticModel:
    return SyntheticModel(
        path=Path(path), words=list(words), token_ids=[int(t) for t in ids],
        f={int(k): int(v) for k, v in f.items()}, g={int(k): int(v) for k, v in g.items()},
        runner_up={int(k): int(v) for k, v in runner_up.items()},
        eog_token_id=int(config["eog_token_id"]),
        eog_after=None if config["eog_after"] is None else int(config["eog_after"]),
        mtp=bool(config["mtp"]), mtp_head=config["mtp_head"], acceptance=float(config["acceptance"]),
        n_trunk=int(config["n_trunk"]), full_attention_interval=int(config["full_attention_interval"]),
        vocab=config["vocab"], dtype=config["dtype"], size=config["size"], seed=int(config["seed"]),
        dims=dict(config["dims"]), n_vocab=int(config["n_vocab"]), n_params=int(config["n_params"]),
        recurrent_layers=list(config["recurrent_layers"]),
        generator_version=int(config["generator_version"]), config=dict(config),
    )


def load_oracle(path) -> SyntheticModel:
    """Rebuild the :class:`SyntheticModel` of a file written by :func:`make_model`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    kv = _read_gguf_kv(path, want=lambda k: k.startswith(_KEY + "."), stop_when_found=True)

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
    return _from_config(path, config, words, ids, f, g, runner_up)


_MAKE_PARAMS = [p for p in inspect.signature(make_model).parameters.values() if p.name != "path"]


def _cache_key(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    names = {p.name for p in _MAKE_PARAMS}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"cached_model() got unexpected keyword arguments {sorted(unknown)}")
    full = {p.name: kwargs.get(p.name, p.default) for p in _MAKE_PARAMS}
    if full.get("vocab_path") is not None:
        full["vocab_path"] = str(Path(full["vocab_path"]).resolve())
    if full.get("chat_template") is None:
        # the default (keep the vocabulary's template) leaves the key, and so the
        # file names of every model generated before this option existed, unchanged
        del full["chat_template"]
    if isinstance(full.get("acceptance"), (int, float)) and not isinstance(full["acceptance"], bool):
        full["acceptance"] = float(full["acceptance"])
    return full


def cached_model(**kwargs) -> SyntheticModel:
    """:func:`make_model` into :func:`cache_dir`, reusing an existing file with the same arguments.

    The file name is a hash of the (defaults-completed) arguments and
    :data:`GENERATOR_VERSION` (``chat_template`` is part of it whenever it is
    not ``None``).
    """
    full = _cache_key(kwargs)
    blob = json.dumps({"v": GENERATOR_VERSION, "kw": full}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    d = cache_dir()
    path = d / f"synthetic-{digest}.gguf"
    if path.is_file():
        try:
            m = load_oracle(path)
            if m.generator_version == GENERATOR_VERSION:
                return m
        except Exception:
            pass
    d.mkdir(parents=True, exist_ok=True)
    return make_model(path, **full)
