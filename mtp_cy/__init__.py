"""mtp_cy: Multi-Token Prediction speculative decoding over llama.cpp, in nogil Cython.

Quick start::

    import mtp_cy
    model = mtp_cy.Model("Qwen3.6-35B-A3B-MTP-Q4_K_M.gguf")
    mtp = mtp_cy.MTP(model, n_draft=3, n_ctx=8192)
    for piece in mtp.stream("Write a haiku about the sea:", max_tokens=200):
        print(piece, end="", flush=True)
    print(mtp.stats()["acceptance_rate"])
"""
from mtp_cy._version import __version__, LLAMA_CPP_COMMIT as llama_cpp_commit
from mtp_cy.errors import (MTPError, ModelLoadError, DecodeError, MTPUnsupportedError, NativeError,
                           SessionBusyError, ClosedError, GenerationTimeout, QueueTimeout, ChatTemplateError,
                           RPCError, GrammarError)
from mtp_cy._core import (Model, Session, MTP, Batch, DraftPolicy, ChatParser, init, system_info, build_info, devices,
                          cpu_pools, rpc_server, json_schema_to_grammar)
from mtp_cy.completion import Completion, Usage, TokenLogprob

__all__ = [
    "__version__", "llama_cpp_commit", "init", "system_info", "build_info", "devices", "cpu_pools", "rpc_server",
    "Model", "Session", "MTP", "Batch", "DraftPolicy", "ChatParser", "json_schema_to_grammar",
    "Completion", "Usage", "TokenLogprob",
    "MTPError", "ModelLoadError", "DecodeError", "MTPUnsupportedError", "NativeError",
    "SessionBusyError", "ClosedError", "GenerationTimeout", "QueueTimeout", "ChatTemplateError", "RPCError",
    "GrammarError",
]
