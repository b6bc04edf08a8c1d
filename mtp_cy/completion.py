"""Per-call results: what one generation call produced and cost.

``Session.complete()`` / ``MTP.complete()`` (and ``complete_chat``) return a
:class:`Completion`; every stream exposes the same object as ``stream.completion``
once it has ended.  Statistics in it are *this call's* (the cumulative ones stay in
``stats()``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger("mtp_cy")

__all__ = ["Completion", "Usage", "TokenLogprob"]


@dataclass(frozen=True)
class Usage:
    """Token counts of one call (OpenAI's ``usage``, with the prompt cache's share)."""

    prompt_tokens: int
    completion_tokens: int
    #: prompt tokens whose state the session already held (not processed again)
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """``prompt_tokens + completion_tokens``."""
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> Dict[str, Any]:
        """OpenAI's ``usage`` object (``prompt_tokens_details.cached_tokens`` included)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token under the model's distribution (the
    log-softmax of the raw logits), and the most probable alternatives when asked for."""

    token: int
    text: str
    logprob: float
    top_logprobs: Tuple[Tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """The result of one generation call."""

    #: the generated text (stop string and what follows excluded)
    text: str
    #: the delivered token ids
    tokens: List[int]
    #: OpenAI's vocabulary: ``"stop"`` (end of text or a stop string), ``"length"``
    #: (``max_tokens`` or a full context), ``"tool_calls"`` (a chat reply that calls
    #: tools), ``"cancelled"`` (``cancel()``, or the stream was closed early) or
    #: ``"error"`` (the stream raised; only seen on ``stream.completion``)
    finish_reason: str
    #: the detail: ``"eog"``, ``"stop_string"``, ``"max_tokens"``, ``"ctx_full"``, ``"cancelled"``,
    #: ``"error"``
    stop_reason: str
    #: the stop string that ended the call (``stop_reason == "stop_string"``), else ``None``
    stop_string: Optional[str]
    usage: Usage
    #: this call's statistics (same keys as ``stats()``: MTP counters, timings)
    stats: Dict[str, Any]
    #: per token, when ``logprobs=True`` was asked for
    logprobs: Optional[List[TokenLogprob]] = None
    #: chat calls: the reply parsed by llama.cpp's chat parser -- an OpenAI assistant
    #: message (``content``, and ``reasoning_content`` / ``tool_calls`` when present)
    message: Optional[Dict[str, Any]] = field(default=None)

    @property
    def reasoning(self) -> Optional[str]:
        """Chat calls: the reasoning (``<think>`` ...) part of the reply, or ``None``."""
        return (self.message or {}).get("reasoning_content") or None

    @property
    def tool_calls(self) -> List[Dict[str, Any]]:
        """Chat calls: the tool calls of the reply (OpenAI's shape), possibly empty."""
        return list((self.message or {}).get("tool_calls") or [])

    @classmethod
    def _from_stream(cls, stream) -> "Completion":
        """Build the result of a stream that has ended (``stream.completion``)."""
        r = stream._result()
        lps = None
        if r["logprobs"] is not None:
            lps = [TokenLogprob(token=tok, text=lp["text"], logprob=lp["logprob"],
                                top_logprobs=tuple(lp["top_logprobs"]))
                   for tok, lp in zip(r["tokens"], r["logprobs"])]
        message = None
        finish = r["finish_reason"]
        parser = r["chat_parser"]
        if parser is not None:
            message = _parse_reply(parser, r["text"], r["stop_reason"])
            if message.get("tool_calls") and finish == "stop":
                finish = "tool_calls"
        return cls(text=r["text"], tokens=r["tokens"], finish_reason=finish, stop_reason=r["stop_reason"],
                   stop_string=r["stop_string"],
                   usage=Usage(prompt_tokens=r["prompt_tokens"], completion_tokens=len(r["tokens"]),
                               cached_tokens=r["cached_tokens"]),
                   stats=r["stats"], logprobs=lps, message=message)


def _parse_reply(parser, text: str, stop_reason: Optional[str]) -> Dict[str, Any]:
    """The reply parsed by ``parser``; a reply the parser rejects (the model did not
    follow its template's format, e.g. broken tool-call markup) is kept whole as
    ``content`` -- logged as a warning -- rather than lost in an exception."""
    partial = stop_reason in ("max_tokens", "ctx_full", "cancelled", "error")
    try:
        return parser.parse(text, partial=partial)
    except Exception as exc:
        logger.warning("chat reply not in the template's format (%s); returned as plain content", exc)
        return {"role": "assistant", "content": text}
