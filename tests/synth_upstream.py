"""Helpers of the mtp_cy.synthetic tests: run upstream's programs on a synthetic model.

The upstream checks run the pinned llama.cpp's own programs (built into
``<repo>/build/native/bin``, or the directory in ``$MTP_CY_UPSTREAM_BIN``):
``llama-speculative-simple --spec-type draft-mtp`` must print exactly the
text and the n_predict / n_drafted / n_accept counters that
``SyntheticModel.predict(..., rules="upstream")`` computes, and
``llama-completion`` exactly ``SyntheticModel.greedy()``.
"""
import re
import subprocess

import numpy as np
import pytest

from mtp_cy import synthetic as syn

from conftest import upstream_bin_dir, upstream_binary

BIN_DIR = upstream_bin_dir()
SPEC = BIN_DIR / "llama-speculative-simple"
COMPLETION = BIN_DIR / "llama-completion"
N_CTX = 512
# Upstream's programs run without weight repacking: on CPUs with AMX_INT8 their repacked
# (extra buffer type) path segfaults in ggml_backend_amx_mul_mat on the synthetic quantized models
# (pinned commit, with or without mtp_cy's patches); what the tests compare -- the programs' loops
# and their output -- does not depend on the weights' memory layout.
NO_REPACK = ("--no-repack",)


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep a module's cached models out of the user's cache (import it into the module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTP_CY_CACHE_DIR", str(tmp_path_factory.mktemp("synthetic-cache")))
        yield


def have(binary):
    return upstream_binary(binary.name) is not None


def need(binary):
    if not have(binary):
        msg = f"upstream binary {binary} not built (set MTP_CY_UPSTREAM_BIN to its directory)"
        print("SKIP:", msg)
        pytest.skip(msg)


def run_spec(model, prompt, n_draft, n_predict, spec_type="draft-mtp", extra=(), text=None,
             p_min=None, md=None, path=None):
    """Run llama-speculative-simple; return (rc, generated text, counters, stderr).

    ``p_min``: ``--spec-draft-p-min``; ``md``: ``-md`` (an MTP sidecar);
    ``path``: the ``-m`` file (default ``model.path``)."""
    text = model.decode(prompt) if text is None else text
    cmd = [str(SPEC), "-m", str(path or model.path), *NO_REPACK, "--spec-type", spec_type, "-n", str(n_predict),
           "-p", text, "--temp", "0", "-c", str(N_CTX), "-t", "2", *extra]
    if spec_type == "draft-mtp":
        cmd += ["--spec-draft-n-max", str(n_draft)]
    if p_min is not None:
        cmd += ["--spec-draft-p-min", repr(float(p_min))]
    if md is not None:
        cmd += ["-md", str(md)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    counters = {k: int(v) for k, v in re.findall(r"\b(n_predict|n_drafted|n_accept)\s*=\s*(\d+)", p.stderr)}
    out = p.stdout.lstrip("\n")
    gen = None
    if p.returncode == 0:
        assert out.startswith(text), (out, text)
        gen = out[len(text):].rstrip("\n")
    return p.returncode, gen, counters, p.stderr


def run_completion(model, prompt, n_predict, path=None):
    """llama-completion's greedy continuation (text after the prompt, without the EOG marker)."""
    text = model.decode(prompt)
    cmd = [str(COMPLETION), "-m", str(path or model.path), *NO_REPACK, "-p", text, "-n", str(n_predict), "--temp", "0",
           "-no-cnv", "--no-warmup", "-c", str(N_CTX), "-t", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.lstrip("\n")
    assert out.startswith(text), (out, text)
    gen = out[len(text):].rstrip("\n")
    eot = " [end of text]"          # tools/completion/completion.cpp prints this at EOG
    return gen[: -len(eot)] if gen.endswith(eot) else gen


def check_upstream(model, prompt, n_draft, n_predict, text=None, p_min=None, md=None, path=None):
    """speculative-simple prints exactly the oracle's text and counters; returns the prediction."""
    want = model.predict(prompt, n_predict, n_draft, rules="upstream", n_ctx=N_CTX, p_min=p_min or 0.0)
    rc, gen, counters, err = run_spec(model, prompt, n_draft, n_predict, text=text, p_min=p_min, md=md, path=path)
    assert rc == 0, err[-3000:]
    got = dict(text=gen, **counters)
    exp = dict(text=want.text, n_predict=want.n_predict, n_drafted=want.n_drafted, n_accept=want.n_accept)
    assert got == exp, (model.config["acceptance"], model.mtp_head, model.arch, n_draft, p_min, prompt)
    # greedy decoding is lossless: the text is the greedy continuation
    assert want.tokens == model.greedy(prompt, len(want.tokens)).tokens
    return want


def cycle_back(m, token, steps):
    """The member `steps` greedy steps before `token` (f is one cycle)."""
    inv = {v: k for k, v in m.f.items()}
    for _ in range(steps):
        token = inv[token]
    return token


def outside_word_id(m):
    """A single-token word that is not in S (it must behave like S[id mod |S|])."""
    for w in (" cat", " dog", " man", " car", " table", " chair"):
        tid = syn.single_token_id(w, m.vocab)
        if tid is not None and tid not in m.f:
            return w, tid
    raise AssertionError("no outside word found")


_GGML_NP = {0: np.float32, 1: np.float16}       # GGML_TYPE_F32 / F16
_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}


def _parse_gguf(path, want_kv):
    """(kv, tensor infos, data offset) of a GGUF file; a plain reader that decodes only the
    keys ``want_kv(key)`` accepts (gguf.GGUFReader decodes every vocabulary string: slow)."""
    import struct
    with open(path, "rb") as fh:
        buf = fh.read(64 << 20)
    assert buf[:4] == b"GGUF"
    n_t, n_kv = struct.unpack_from("<QQ", buf, 8)
    off = 24

    def rstr(o):
        n, = struct.unpack_from("<Q", buf, o)
        return buf[o + 8:o + 8 + n].decode("utf-8", "surrogateescape"), o + 8 + n

    def value(o, t, decode):
        if t == 8:
            s, o2 = rstr(o)
            return (s if decode else None), o2
        if t == 9:
            st, n = struct.unpack_from("<IQ", buf, o)
            o += 12
            vals = []
            for _ in range(n):
                v, o = value(o, st, decode)
                vals.append(v)
            return (vals if decode else None), o
        dt = np.dtype(_SCALAR[t])
        v = np.frombuffer(buf, dtype=dt, count=1, offset=o)[0].item()
        return (bool(v) if t == 7 else v), o + dt.itemsize

    kv = {}
    for _ in range(n_kv):
        key, off = rstr(off)
        t, = struct.unpack_from("<I", buf, off)
        v, off = value(off + 4, t, want_kv(key))
        if want_kv(key):
            kv[key] = v
    infos = []
    for _ in range(n_t):
        name, off = rstr(off)
        nd, = struct.unpack_from("<I", buf, off)
        shape = struct.unpack_from(f"<{nd}Q", buf, off + 4)
        typ, toff = struct.unpack_from("<IQ", buf, off + 4 + 8 * nd)
        off += 4 + 8 * nd + 12
        infos.append((name, tuple(reversed(shape)), typ, toff))
    align = kv.get("general.alignment", 32)
    return kv, infos, (off + align - 1) // align * align


def gguf_tensors(path):
    """{name: float32 numpy array (numpy shape order)} of a GGUF file's f16/f32 tensors."""
    _, infos, data = _parse_gguf(path, lambda k: k == "general.alignment")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, shape, typ, toff in infos:
        dt = np.dtype(_GGML_NP[typ])
        n = int(np.prod(shape))
        out[name] = np.frombuffer(mm, dtype=dt, count=n, offset=data + toff).reshape(shape).astype(np.float32)
    return out


def gguf_tensor_types(path):
    """{name: GGML type id} of a GGUF file's tensors."""
    return {name: typ for name, _, typ, _ in _parse_gguf(path, lambda k: False)[1]}


def gguf_kv(path):
    """{key: value} of a GGUF file's non-tokenizer metadata."""
    return _parse_gguf(path, lambda k: not k.startswith("tokenizer."))[0]
