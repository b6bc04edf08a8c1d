"""docs/coming_from_llama_cpp_python.md names only what exists."""
import re
from pathlib import Path

import pytest

import mtp_cy
from mtp_cy import _core, openai_compat, server  # noqa: F401 - mtp_cy.server is named in the doc

DOC = Path(__file__).resolve().parents[1] / "docs" / "coming_from_llama_cpp_python.md"


@pytest.fixture(scope="module")
def doc():
    if not DOC.is_file():
        pytest.skip("docs/ is not shipped with the package")
    return DOC.read_text(encoding="utf-8")


def test_named_methods_and_attributes_exist(doc):
    for name in re.findall(r"`model\.([a-z_]+)", doc):
        assert hasattr(mtp_cy.Model, name), f"model.{name}"
    for name in re.findall(r"`(?:llm|session)\.([a-z_]+)\(", doc) + re.findall(r"`session\.([a-z_]+)", doc):
        if name in ("tokenize", "detokenize", "token_bos", "token_eos", "n_vocab", "metadata"):
            continue          # llama-cpp-python's own Llama methods, in its column
        assert hasattr(mtp_cy.MTP, name) or hasattr(mtp_cy.Session, name), name
    for name in re.findall(r"`(?:MTP|mtp_cy\.MTP)\.([a-z_]+)", doc) + re.findall(r"MTP\.([a-z_]+)\(\)", doc):
        assert hasattr(mtp_cy.MTP, name), name
    for name in re.findall(r"`mtp_cy\.([A-Za-z_]+)", doc):
        assert hasattr(mtp_cy, name), name


def test_named_options_exist(doc):
    for opt in ("cache_prompt", "cache_checkpoints", "checkpoint_every", "n_batch", "n_ubatch", "n_threads",
                "n_threads_batch", "flash_attn", "type_k", "type_v", "offload_kqv"):
        assert opt in doc and opt in _core.CONTEXT_OPTIONS
    for opt in ("temp", "penalty_freq", "penalty_present", "penalty_repeat", "penalty_last_n", "grammar",
                "grammar_root", "json_schema", "logprobs", "top_logprobs", "timeout", "prompt_timeout",
                "emit_stats_every", "stop", "seed", "max_tokens"):
        assert f"`{opt}" in doc and opt in _core.STREAM_OPTIONS, opt
    for p in openai_compat.IGNORED_PARAMETERS:
        assert f"`{p}`" in doc, p


def test_server_options_exist(doc):
    """The right column of the llama_cpp.server table names options that ``serve`` has."""
    from mtp_cy.__main__ import build_parser
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices["serve"]
    known = {o for a in sub._actions for o in a.option_strings}
    sec = doc[doc.index("## A server"):]
    rows = [ln for ln in sec.splitlines() if ln.startswith("| `")]
    assert len(rows) > 10
    named = [o for ln in rows for o in re.findall(r"`(--[a-z]+(?:-[a-z]+)*)(?=[ `])", ln.rsplit(" | ", 1)[1])]
    assert "--model-alias" in named and "--api-key" in named
    for o in named:
        assert o in known, o
