"""Exception hierarchy of mtp_cy.

Every error raised by the native layer derives from :class:`MTPError` (itself a
:class:`RuntimeError`).  Invalid arguments raise the builtin :class:`ValueError`
or :class:`TypeError` naming the argument and the allowed range.
"""

__all__ = [
    "MTPError", "ModelLoadError", "DecodeError", "MTPUnsupportedError", "NativeError",
    "SessionBusyError", "ClosedError", "GenerationTimeout", "ChatTemplateError", "RPCError", "GrammarError",
]


class MTPError(RuntimeError):
    """Base class of every mtp_cy error."""


class ModelLoadError(MTPError):
    """A model file could not be loaded (missing, not a GGUF, truncated, unknown architecture...)."""


class DecodeError(MTPError):
    """llama.cpp failed to evaluate a batch (the session stays usable)."""


class NativeError(MTPError):
    """llama.cpp raised a C++ exception during a call (its message is kept); the
    session stays usable.  Example: a grammar that reaches a dead end
    ("Unexpected empty grammar stack after accepting piece")."""


class MTPUnsupportedError(MTPError):
    """The model cannot run MTP speculative decoding (no MTP layers, or not loaded)."""


class SessionBusyError(MTPError):
    """A second stream was started on a session whose previous stream is still open."""


class ClosedError(MTPError):
    """The model or session was used after ``close()`` (or was closed during a stream).

    A state error, not an argument error: it is an :class:`MTPError` (and so a
    ``RuntimeError``), not a ``ValueError``."""


class GenerationTimeout(MTPError, TimeoutError):
    """No token arrived within the ``timeout`` of a stream (also a builtin ``TimeoutError``)."""


class QueueTimeout(GenerationTimeout):
    """A :class:`mtp_cy.Batch` call waited its whole ``timeout`` for a free sequence slot (every
    slot stayed busy); nothing was generated.  A :class:`GenerationTimeout` (and ``TimeoutError``)."""


class GrammarError(MTPError, ValueError):
    """A GBNF grammar or JSON schema that mtp_cy refuses (also a builtin :class:`ValueError`):
    malformed, or beyond the bounds that keep llama.cpp's recursive parser and sampler safe
    (see :mod:`mtp_cy._grammar_check`).  ``line`` / ``column`` (1-based) locate the problem in
    the grammar text, ``path`` is the JSON pointer of the offending part of a schema (each
    ``None`` when it does not apply)."""

    def __init__(self, message: str, line=None, column=None, path=None):
        if line is not None:
            where = f" at line {line}, column {column}"
        elif path is not None:
            where = f" at {path or '/'}"
        else:
            where = ""
        what = "invalid JSON schema" if path is not None else "invalid grammar"
        super().__init__(f"{what}{where}: {message}")
        self.line, self.column, self.path = line, column, path


class ChatTemplateError(MTPError, ValueError):
    """A chat template could not be parsed or rendered (also a builtin :class:`ValueError`).

    Raised by :meth:`Model.apply_chat_template` (and ``chat``/``achat``) when the
    model has no ``tokenizer.chat_template`` and no ``template=`` was given, when
    the Jinja template does not parse, or when rendering fails (for example the
    template's own ``raise_exception(...)`` rejecting the conversation).
    """


class RPCError(MTPError, ConnectionError):
    """An RPC server (``Model(rpc_servers=...)``, :func:`mtp_cy.devices`) did not answer, or
    its connection failed (also a builtin :class:`ConnectionError`).

    ``endpoint`` is the server's ``"host:port"`` (``None`` when the error is not about
    one server).  A model whose server failed mid-way cannot be used again (its
    layers on that server are gone): every later stream on it raises this error;
    ``close()`` it and load it again.
    """

    def __init__(self, message, endpoint=None):
        super().__init__(message)
        self.endpoint = endpoint
