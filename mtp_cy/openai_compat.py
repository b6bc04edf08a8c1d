"""OpenAI-shaped results: ``create_completion`` and ``create_chat_completion``.

``Session.create_completion(prompt, ...)`` / ``MTP.create_completion`` and
``Session.create_chat_completion(messages, ...)`` / ``MTP.create_chat_completion``
call the functions of this module.  They take OpenAI's request parameters and
return what OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` return, as
plain dicts (the shapes ``llama-cpp-python``'s ``Llama.create_completion`` /
``create_chat_completion`` return): ``openai.types.Completion`` /
``openai.types.chat.ChatCompletion`` accept them, and so does the ``openai``
client when a server hands them out as JSON.  With ``stream=True`` they return an
iterator of chunk dicts (``text_completion`` objects, resp.
``chat.completion.chunk`` objects; ``openai.types.chat.ChatCompletionChunk``
accepts the latter), ready to be sent as server-sent events.

Parameters (OpenAI's names)
---------------------------
* ``max_tokens`` / ``max_completion_tokens`` (the same; giving both with different
  values is an error): default 16 for completions (as OpenAI and
  llama-cpp-python), ``None`` for chat (until the model ends the reply or the
  context is full).
* ``temperature`` (``0``: greedy), ``top_p``, ``frequency_penalty``,
  ``presence_penalty`` (both in [-2, 2]), ``stop`` (a str or a list of str),
  ``seed``.  Sampler parameters not given keep mtp_cy's defaults (those of
  llama.cpp: ``temperature=0.8, top_p=0.95, top_k=40, min_p=0.05``) -- not
  OpenAI's ``temperature=1, top_p=1``: pass them explicitly to get those.
* completions: ``logprobs=N`` (0..20): per token its log-probability and the
  ``N`` most likely alternatives, plus the sampled token itself when it is not among
  them (OpenAI's and llama-cpp-python's rule: so ``logprobs=0`` lists just the sampled
  token).
  chat: ``logprobs=True`` and ``top_logprobs=N`` (0..20).  Log-probabilities are
  the log-softmax of the model's raw logits (before temperature, penalties and
  grammar), a non-finite one is reported as ``-9999.0`` as OpenAI does.  In chat
  replies they cover every generated token (reasoning and tool-call markup
  included).
* ``stream`` and ``stream_options={"include_usage": True}`` (then every chunk has
  ``"usage": None`` and a last chunk with no choices carries the usage;
  ``include_obfuscation`` is accepted and ignored: nothing is obfuscated).
* ``model``: the name written in the result (default: the model file's stem).
* chat: ``tools`` (function tools), ``tool_choice`` (``"auto"`` only),
  ``parallel_tool_calls`` (``None``/``False``: llama.cpp's parser takes at most one
  call per reply), ``response_format`` (``{"type": "text"}``,
  ``{"type": "json_object"}`` -- optionally with llama-cpp-python's
  ``"schema"`` -- or ``{"type": "json_schema", "json_schema": {"schema": ...}}``:
  the reply is constrained by a grammar made from the schema with llama.cpp's
  converter, and the whole reply is the message's ``content``; unless
  ``enable_thinking`` is given, templates are rendered with
  ``enable_thinking=False`` so that the JSON is not written inside an open
  ``<think>`` block).
* extensions (llama.cpp / llama-cpp-python names): ``top_k``, ``min_p``,
  ``repeat_penalty``, ``grammar`` (GBNF text), ``json_schema``, ``timeout``,
  ``prompt_timeout``; chat: ``chat_template_kwargs``, ``enable_thinking``,
  ``template``.

Accepted and ignored (they do not change the output): ``user``, ``metadata``,
``store``, ``service_tier``, ``safety_identifier``, ``prompt_cache_key``.  OpenAI
parameters that mtp_cy cannot honour raise ``ValueError`` unless they have their
neutral value (or ``None``): ``n`` (1), ``best_of`` (1), ``echo`` (False), ``suffix`` (None),
``logit_bias`` (None or empty), ``functions`` / ``function_call`` (None; use
``tools``), ``modalities`` (``["text"]``), ``audio``, ``prediction``,
``reasoning_effort``, ``web_search_options``, ``verbosity`` (None).  Any other
name raises ``TypeError``.

Results
-------
``id`` (``cmpl-...`` / ``chatcmpl-...``), ``created`` (Unix time), ``model``,
``system_fingerprint`` (mtp_cy's and llama.cpp's versions), ``choices`` (one),
``usage`` with ``prompt_tokens_details.cached_tokens`` (prompt tokens whose state
the session's prompt cache already held).  ``finish_reason``: ``"stop"`` (the
model ended the text, or a stop string), ``"length"`` (``max_tokens`` or a full
context), ``"tool_calls"`` (chat: the reply calls tools).  A call stopped with
``cancel()`` (or a consumer that stops reading a stream: then no last chunk is
produced at all) has no OpenAI word: it is reported as ``"stop"``; the
:class:`mtp_cy.Completion` of ``complete()`` says ``"cancelled"``.

Chat replies are parsed with llama.cpp's chat parser (the one ``llama-server``
uses) for the model's template: ``message.content``, ``message.reasoning_content``
(e.g. Qwen3's ``<think>`` block; an extra key, as llama-server writes it) and
``message.tool_calls`` (OpenAI's shape, ids ``call_...``).  Streaming chat chunks
carry the same split as deltas (``content``, ``reasoning_content``,
``tool_calls`` with ``index``, then ``function.arguments`` pieces).
"""
from __future__ import annotations

import codecs
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

__all__ = ["create_completion", "create_chat_completion", "acreate_completion", "acreate_chat_completion", "IGNORED_PARAMETERS", "NEUTRAL_ONLY_PARAMETERS"]

#: OpenAI parameters accepted and ignored (they do not affect generation)
IGNORED_PARAMETERS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                                "prompt_cache_key"})

_NEUTRAL_COMMON: Dict[str, Tuple[Any, ...]] = {"n": (None, 1), "logit_bias": (None, {})}
_NEUTRAL_COMPLETION = dict(_NEUTRAL_COMMON, best_of=(None, 1), echo=(None, False), suffix=(None, ""))
_NEUTRAL_CHAT = dict(_NEUTRAL_COMMON, functions=(None,), function_call=(None,), modalities=(None, ["text"]),
                     audio=(None,), prediction=(None,), reasoning_effort=(None,), web_search_options=(None,),
                     verbosity=(None,))
#: OpenAI parameters that are only accepted with their neutral value (anything else: ValueError)
NEUTRAL_ONLY_PARAMETERS = {"completion": _NEUTRAL_COMPLETION, "chat": _NEUTRAL_CHAT}

_WHY = {
    "n": "one choice per call (call again for more)",
    "best_of": "one choice per call",
    "echo": "the prompt is not echoed (it is the caller's own text)",
    "suffix": "no fill-in-the-middle",
    "logit_bias": "logit biases are not supported (use grammar= or json_schema= to constrain the output)",
    "functions": "the legacy functions API is not supported: use tools=",
    "function_call": "the legacy functions API is not supported: use tools= and tool_choice=",
    "modalities": "text only",
    "audio": "text only",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "use chat_template_kwargs= for the template's own reasoning switches "
                        "(e.g. enable_thinking=False)",
    "web_search_options": "no web search",
    "verbosity": "not supported",
}

# OpenAI name -> mtp_cy stream option (sampler and stream options shared by both endpoints)
_SAMPLER_MAP = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "frequency_penalty": "penalty_freq", "presence_penalty": "penalty_present",
                "repeat_penalty": "penalty_repeat", "seed": "seed", "stop": "stop", "grammar": "grammar",
                "json_schema": "json_schema", "timeout": "timeout", "prompt_timeout": "prompt_timeout",
                "n_draft": "n_draft",   # this request's draft length (0: plain; at most the engine's)
                "spec_sampling": "spec_sampling"}   # "rejection" | "match": how sampled drafts are verified
_COMMON = ("model", "max_tokens", "max_completion_tokens", "stream_options", "logprobs", "response_format")
_COMPLETION_PARAMS = frozenset(_SAMPLER_MAP) | frozenset(_COMMON) | IGNORED_PARAMETERS | frozenset(_NEUTRAL_COMPLETION)
_CHAT_PARAMS = (frozenset(_SAMPLER_MAP) | frozenset(_COMMON) | IGNORED_PARAMETERS | frozenset(_NEUTRAL_CHAT)
                | {"top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                   "enable_thinking", "template"})

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}


def _fingerprint() -> str:
    from mtp_cy import __version__, llama_cpp_commit
    return f"mtp_cy-{__version__}-llama.cpp-{str(llama_cpp_commit)[:8]}"


def _model_name(engine, model) -> str:
    if model is None:
        return os.path.splitext(os.path.basename(engine.model.path))[0]
    if not isinstance(model, str):
        raise TypeError(f"model must be a str (the name written in the result), got {type(model).__name__}")
    return model


def _check_params(kwargs: Dict[str, Any], allowed, neutral, where: str) -> None:
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s): {', '.join(unknown)}; "
                        f"see mtp_cy.openai_compat for the supported OpenAI parameters")
    for name, ok in neutral.items():
        if name in kwargs:
            v = kwargs[name]
            if not any(v == x and type(v) is type(x) or (v is None and x is None) for x in ok):
                raise ValueError(f"{name}={v!r} is not supported ({_WHY[name]}); "
                                 f"only {' or '.join(repr(x) for x in ok)} is accepted")


def _number(name, v, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi) or v != v:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")
    return v


def _max_tokens(kwargs, default):
    a, b = kwargs.get("max_tokens", default), kwargs.get("max_completion_tokens", default)
    if "max_tokens" in kwargs and "max_completion_tokens" in kwargs and a != b:
        raise ValueError(f"max_tokens={a!r} and max_completion_tokens={b!r} disagree (they mean the same)")
    return a if "max_tokens" in kwargs else b


def _stream_options(kwargs, stream) -> bool:
    so = kwargs.get("stream_options")
    if so is None:
        return False
    if not stream:
        raise ValueError("stream_options is only allowed with stream=True")
    if not isinstance(so, Mapping):
        raise TypeError(f"stream_options must be a dict, got {type(so).__name__}")
    bad = sorted(set(so) - {"include_usage", "include_obfuscation"})
    if bad:
        raise ValueError(f"unsupported stream_options: {', '.join(bad)} (supported: include_usage)")
    iu = so.get("include_usage", False)
    if not isinstance(iu, bool):
        raise TypeError(f"stream_options['include_usage'] must be True or False, got {iu!r}")
    return iu


def _response_format_schema(rf):
    """The JSON schema a ``response_format`` asks for (``None`` for plain text)."""
    if rf is None:
        return None
    if not isinstance(rf, Mapping):
        raise TypeError(f"response_format must be a dict, got {type(rf).__name__}")
    t = rf.get("type")
    if t == "text":
        return None
    if t == "json_object":
        schema = rf.get("schema")           # llama-cpp-python's extension
        return {"type": "object"} if schema is None else schema
    if t == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping):
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' dict "
                             "({'name': ..., 'schema': {...}})")
        schema = js.get("schema")
        return {} if schema is None else schema
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {t!r}")


def _options(kwargs, *, stream, max_default) -> Tuple[Dict[str, Any], bool]:
    """Translate the shared OpenAI parameters into stream options; returns (options, include_usage)."""
    o: Dict[str, Any] = {}
    for name, opt in _SAMPLER_MAP.items():
        if name in kwargs and kwargs[name] is not None:
            o[opt] = kwargs[name]
    for name in ("frequency_penalty", "presence_penalty"):
        if kwargs.get(name) is not None:
            _number(name, kwargs[name], -2.0, 2.0)
    o["max_tokens"] = _max_tokens(kwargs, max_default)
    schema = _response_format_schema(kwargs.get("response_format"))
    if schema is not None:
        if "json_schema" in o or "grammar" in o:
            raise ValueError("response_format cannot be combined with json_schema= or grammar=")
        o["json_schema"] = schema
    return o, _stream_options(kwargs, stream)


def _usage(c) -> Dict[str, Any]:
    return c.usage.as_dict()


def _lp(v: float) -> float:
    v = float(v)
    return v if math.isfinite(v) else -9999.0


class _Pieces:
    """Token id -> bytes / text, cached for one call."""

    def __init__(self, model):
        self.model = model
        self.cache: Dict[int, bytes] = {}

    def bytes(self, tok: int) -> bytes:
        b = self.cache.get(tok)
        if b is None:
            b = self.cache[tok] = self.model.token_to_piece(int(tok))
        return b

    def text(self, tok: int) -> str:
        return self.bytes(tok).decode("utf-8", "replace")


# ------------------------------------------------------------------ completions

class _CompletionLogprobs:
    """OpenAI's legacy ``logprobs`` object, built token by token."""

    def __init__(self, pieces: _Pieces, n_top: int, base_offset: int):
        self.p = pieces
        self.n = n_top
        self.offset = base_offset
        self.dec = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, out: Dict[str, list], tok: int, lp: float, top) -> None:
        text = self.p.text(tok)
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(lp))
        tops: Dict[str, float] = {}
        for tid, v in list(top)[: self.n]:
            tops.setdefault(self.p.text(tid), _lp(v))
        tops.setdefault(text, _lp(lp))         # OpenAI (and llama-cpp-python) always list the sampled token
        out["top_logprobs"].append(tops)
        out["text_offset"].append(self.offset)
        self.offset += len(self.dec.decode(self.p.bytes(tok)))

    @staticmethod
    def empty() -> Dict[str, list]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _prompt_arg(prompt):
    """OpenAI allows a list of one prompt; batches (several prompts) are not supported."""
    if isinstance(prompt, (list, tuple)) and len(prompt) == 1 and isinstance(prompt[0], (str, list, tuple)):
        return prompt[0]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(x, (str, list, tuple)) for x in prompt):
        raise ValueError(f"a batch of {len(prompt)} prompts is not supported: one prompt per call")
    return prompt


def _prompt_text_len(engine, prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    try:
        return len(engine.model.detokenize(list(prompt)))
    except Exception:
        return 0


class _CompletionPlan:
    """One ``/v1/completions`` request, validated: its stream options and how to shape the result."""

    def __init__(self, engine, prompt, stream, kwargs, where):
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        _check_params(kwargs, _COMPLETION_PARAMS, _NEUTRAL_COMPLETION, where)
        model = _model_name(engine, kwargs.get("model"))
        self.opts, self.include_usage = _options(kwargs, stream=stream, max_default=16)
        n_lp = kwargs.get("logprobs")
        if n_lp is not None:
            if isinstance(n_lp, bool) or not isinstance(n_lp, int):
                raise TypeError(f"logprobs must be an int (the number of alternatives per token, 0..20) or None "
                                f"for completions, got {n_lp!r}")
            if not 0 <= n_lp <= 20:
                raise ValueError(f"logprobs must be in [0, 20], got {n_lp}")
            self.opts["logprobs"] = True
            self.opts["top_logprobs"] = n_lp
        self.n_lp = n_lp
        self.prompt = _prompt_arg(prompt)
        self.engine = engine
        self.head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                     "model": model, "system_fingerprint": _fingerprint()}
        self.pieces = _Pieces(engine.model)

    def _builder(self):
        return _CompletionLogprobs(self.pieces, self.n_lp, _prompt_text_len(self.engine, self.prompt))

    def result(self, c) -> Dict[str, Any]:
        """The ``text_completion`` dict of a finished call."""
        logprobs = None
        if self.n_lp is not None:
            logprobs = _CompletionLogprobs.empty()
            b = self._builder()
            for t in c.logprobs or ():
                b.add(logprobs, t.token, t.logprob, t.top_logprobs)
        return dict(self.head, choices=[{"text": c.text, "index": 0, "logprobs": logprobs,
                                         "finish_reason": _FINISH[c.finish_reason]}], usage=_usage(c))

    def chunker(self, events) -> "_CompletionChunker":
        return _CompletionChunker(self, events)


class _CompletionChunker:
    """Turns the events of one call into ``text_completion`` chunks (sync and async streams alike)."""

    def __init__(self, plan: _CompletionPlan, events):
        self.head = plan.head
        self.include_usage = plan.include_usage
        self.extra = {"usage": None} if plan.include_usage else {}
        self.builder = plan._builder() if plan.n_lp is not None else None
        self.pending = _CompletionLogprobs.empty()

    def start(self) -> List[Dict[str, Any]]:
        return []

    def feed(self, ev) -> List[Dict[str, Any]]:
        if ev[0] != "token":
            return []
        if self.builder is not None:
            lp = ev[3]
            self.builder.add(self.pending, ev[1], lp["logprob"], lp["top_logprobs"])
        if not ev[2]:
            return []                 # the first bytes of a character: its text comes with the next token
        logprobs = None
        if self.builder is not None:
            logprobs, self.pending = self.pending, _CompletionLogprobs.empty()
        return [dict(self.head, choices=[{"text": ev[2], "index": 0, "logprobs": logprobs, "finish_reason": None}],
                     **self.extra)]

    def end(self, c) -> List[Dict[str, Any]]:
        logprobs = self.pending if self.builder is not None and self.pending["tokens"] else None
        out = [dict(self.head, choices=[{"text": "", "index": 0, "logprobs": logprobs,
                                         "finish_reason": _FINISH[c.finish_reason]}], **self.extra)]
        if self.include_usage:
            out.append(dict(self.head, choices=[], usage=_usage(c)))
        return out


def _chunks(events, ch) -> Iterator[Dict[str, Any]]:
    try:
        yield from ch.start()
        for ev in events:
            yield from ch.feed(ev)
        yield from ch.end(events.completion)
    finally:
        events.close()


def create_completion(engine, prompt: Union[str, Sequence[int]], *, stream: bool = False, **kwargs):
    """OpenAI's ``/v1/completions`` on ``engine`` (a :class:`mtp_cy.Session`, :class:`mtp_cy.MTP`
    or :class:`mtp_cy.Batch`).

    ``prompt`` is a str or a list of token ids (or a list holding one of them).
    Returns a ``text_completion`` dict, or with ``stream=True`` an iterator of
    ``text_completion`` chunk dicts: one per piece of text (``finish_reason`` ``None``),
    then one with ``text == ""`` and the ``finish_reason``, then (with
    ``stream_options={"include_usage": True}``) one with no choices and the usage.
    The stream is opened before this returns (argument errors and
    :class:`mtp_cy.SessionBusyError` are raised here); closing the iterator
    stops generation.  See the module documentation for the parameters."""
    plan = _CompletionPlan(engine, prompt, stream, kwargs, "create_completion")
    if not stream:
        return plan.result(engine.complete(plan.prompt, **plan.opts))
    events = engine.stream_events(plan.prompt, **plan.opts)
    return _chunks(events, plan.chunker(events))


# ------------------------------------------------------------------ chat completions

def _chat_logprob(pieces: _Pieces, tok: int, lp: float, top, n: int) -> Dict[str, Any]:
    b = pieces.bytes(tok)
    return {"token": b.decode("utf-8", "replace"), "logprob": _lp(lp), "bytes": list(b),
            "top_logprobs": [{"token": pieces.text(t), "logprob": _lp(v), "bytes": list(pieces.bytes(t))}
                             for t, v in list(top)[:n]]}


def _tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _openai_message(msg: Optional[Mapping[str, Any]], text: str) -> Dict[str, Any]:
    """The parsed reply as OpenAI's assistant message (ids given to the tool calls)."""
    if msg is None:
        return {"role": "assistant", "content": text}
    out: Dict[str, Any] = {"role": "assistant"}
    calls = []
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {}
        calls.append({"id": tc.get("id") or _tool_call_id(), "type": "function",
                      "function": {"name": fn.get("name", ""), "arguments": fn.get("arguments", "")}})
    content = msg.get("content")
    out["content"] = content if content else (None if calls else "")
    if msg.get("reasoning_content"):
        out["reasoning_content"] = msg["reasoning_content"]
    if calls:
        out["tool_calls"] = calls
    return out


def _chat_args(kwargs, where):
    _check_params(kwargs, _CHAT_PARAMS, _NEUTRAL_CHAT, where)
    tools = kwargs.get("tools")
    tc = kwargs.get("tool_choice")
    if tc is not None and tc != "auto":
        raise ValueError(f"tool_choice={tc!r} is not supported: only 'auto' (the model decides; llama.cpp's "
                         f"parser extracts the calls); leave tools out for no tool calls")
    ptc = kwargs.get("parallel_tool_calls")
    if ptc not in (None, False):
        raise ValueError("parallel_tool_calls=True is not supported: llama.cpp's chat parser, as set up by "
                         "mtp_cy, extracts at most one tool call per reply")
    schema = _response_format_schema(kwargs.get("response_format"))
    if schema is not None and tools:
        raise ValueError("response_format cannot be combined with tools (the grammar of the format leaves "
                         "no room for tool calls)")
    ctk = kwargs.get("chat_template_kwargs")
    et = kwargs.get("enable_thinking")
    if schema is not None and et is None and not (isinstance(ctk, Mapping) and "enable_thinking" in ctk):
        et = False    # the JSON document is the reply: not inside an open <think> block
    chat_kw = {"template": kwargs.get("template"), "chat_template_kwargs": ctk}
    if tools:
        chat_kw["tools"] = tools
    if et is not None:
        chat_kw["enable_thinking"] = et
    return chat_kw, schema is not None


class _ChatPlan:
    """One ``/v1/chat/completions`` request, validated."""

    def __init__(self, engine, messages, stream, kwargs, where):
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        self.chat_kw, self.raw = _chat_args(kwargs, where)
        model = _model_name(engine, kwargs.get("model"))
        self.opts, self.include_usage = _options(kwargs, stream=stream, max_default=None)
        lp_flag = kwargs.get("logprobs")
        n_top = kwargs.get("top_logprobs")
        if lp_flag is not None and not isinstance(lp_flag, bool):
            raise TypeError(f"logprobs must be True or False for chat completions, got {lp_flag!r}")
        if n_top is not None:
            if isinstance(n_top, bool) or not isinstance(n_top, int):
                raise TypeError(f"top_logprobs must be an int in [0, 20], got {n_top!r}")
            if not 0 <= n_top <= 20:
                raise ValueError(f"top_logprobs must be in [0, 20], got {n_top}")
            if n_top and not lp_flag:
                raise ValueError("top_logprobs needs logprobs=True")
        if lp_flag:
            self.opts["logprobs"] = True
            self.opts["top_logprobs"] = n_top or 0
        self.lp_flag = bool(lp_flag)
        self.n_top = n_top or 0
        self.messages = messages
        self.head = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                     "model": model, "system_fingerprint": _fingerprint()}
        self.pieces = _Pieces(engine.model)

    def result(self, c) -> Dict[str, Any]:
        """The ``chat.completion`` dict of a finished call."""
        msg = {"role": "assistant", "content": c.text} if self.raw else _openai_message(c.message, c.text)
        logprobs = None
        if self.lp_flag:
            logprobs = {"content": [_chat_logprob(self.pieces, t.token, t.logprob, t.top_logprobs, self.n_top)
                                    for t in c.logprobs or ()], "refusal": None}
        finish = c.finish_reason
        if self.raw and finish == "tool_calls":
            finish = "stop"
        return dict(self.head, choices=[{"index": 0, "message": msg, "logprobs": logprobs,
                                         "finish_reason": _FINISH[finish]}], usage=_usage(c))

    def chunker(self, events) -> "_ChatChunker":
        return _ChatChunker(self, events)


def create_chat_completion(engine, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **kwargs):
    """OpenAI's ``/v1/chat/completions`` on ``engine`` (a :class:`mtp_cy.Session`,
    :class:`mtp_cy.MTP` or :class:`mtp_cy.Batch`).

    ``messages`` are OpenAI chat messages, rendered with the model's chat template
    (see :meth:`mtp_cy.Session.chat`).  Returns a ``chat.completion`` dict whose
    message is the reply parsed by llama.cpp's chat parser (``content``,
    ``reasoning_content``, ``tool_calls``), or with ``stream=True`` an iterator of
    ``chat.completion.chunk`` dicts: the first has ``delta == {"role": "assistant",
    "content": ""}``, then deltas of ``reasoning_content`` / ``content`` /
    ``tool_calls``, then an empty delta with the ``finish_reason``, then (with
    ``stream_options={"include_usage": True}``) a chunk with no choices and the
    usage.  The stream is opened before this returns; closing the iterator stops
    generation.  See the module documentation for the parameters."""
    plan = _ChatPlan(engine, messages, stream, kwargs, "create_chat_completion")
    if not stream:
        return plan.result(engine.complete_chat(messages, **plan.chat_kw, **plan.opts))
    events = engine.chat_events(messages, **plan.chat_kw, **plan.opts)
    return _chunks(events, plan.chunker(events))


class _DeltaState:
    """What the deltas sent so far add up to; turns successive parses into deltas."""

    def __init__(self):
        self.reasoning = ""
        self.content = ""
        self.calls: List[List[str]] = []       # [id, name, arguments]

    def deltas(self, msg: Mapping[str, Any]) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        r = msg.get("reasoning_content") or ""
        if len(r) > len(self.reasoning) and r.startswith(self.reasoning):
            out.append({"reasoning_content": r[len(self.reasoning):]})
            self.reasoning = r
        c = msg.get("content") or ""
        if len(c) > len(self.content) and c.startswith(self.content):
            out.append({"content": c[len(self.content):]})
            self.content = c
        for i, tc in enumerate(msg.get("tool_calls") or ()):
            fn = tc.get("function") or {}
            name, args = fn.get("name") or "", fn.get("arguments") or ""
            if i < len(self.calls):
                have = self.calls[i]
                if len(args) > len(have[2]) and args.startswith(have[2]):
                    out.append({"tool_calls": [{"index": i, "function": {"arguments": args[len(have[2]):]}}]})
                    have[2] = args
            elif i == len(self.calls) and name:
                call_id = tc.get("id") or _tool_call_id()
                self.calls.append([call_id, name, args])
                out.append({"tool_calls": [{"index": i, "id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": args}}]})
            else:
                break
        return out


class _ChatChunker:
    """Turns the events of one chat call into ``chat.completion.chunk`` dicts (sync and async)."""

    def __init__(self, plan: _ChatPlan, events):
        self.head = dict(plan.head, object="chat.completion.chunk")
        self.include_usage = plan.include_usage
        self.extra = {"usage": None} if plan.include_usage else {}
        self.events = events
        self.raw = plan.raw
        self.pieces = plan.pieces
        self.lp_flag = plan.lp_flag
        self.n_top = plan.n_top
        self.state = _DeltaState()
        self.text = ""
        self.pending: List[Dict[str, Any]] = []

    def _chunk(self, delta, finish=None):
        logprobs = None
        if self.lp_flag and (self.pending or finish is not None):
            logprobs, self.pending = {"content": self.pending, "refusal": None}, []
        return dict(self.head, choices=[{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                    **self.extra)

    def start(self) -> List[Dict[str, Any]]:
        return [dict(self.head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}], **self.extra)]

    def feed(self, ev) -> List[Dict[str, Any]]:
        if ev[0] != "token":
            return []
        if self.lp_flag:
            lp = ev[3]
            self.pending.append(_chat_logprob(self.pieces, ev[1], lp["logprob"], lp["top_logprobs"], self.n_top))
        if not ev[2]:
            return []
        self.text += ev[2]
        parser = None if self.raw else self.events.chat_parser
        if parser is None:
            deltas = self.state.deltas({"content": self.text})
        else:
            try:
                deltas = self.state.deltas(parser.parse(self.text, partial=True))
            except Exception:
                deltas = []       # not parseable yet: wait for more text
        return [self._chunk(d) for d in deltas]

    def end(self, c) -> List[Dict[str, Any]]:
        if self.raw or self.events.chat_parser is None:
            final = {"content": c.text}
            finish = "stop" if c.finish_reason == "tool_calls" else c.finish_reason
        else:
            final = _openai_message(c.message, c.text)
            finish = c.finish_reason
            # the tool calls streamed so far keep their ids
            for i, tc in enumerate(final.get("tool_calls") or ()):
                if i < len(self.state.calls):
                    tc["id"] = self.state.calls[i][0]
        out = [self._chunk(d) for d in self.state.deltas(final)]
        out.append(self._chunk({}, _FINISH[finish]))
        if self.include_usage:
            out.append(dict(self.head, choices=[], usage=_usage(c)))
        return out


# ------------------------------------------------------------------ asyncio

async def _drain(events):
    """Run an :class:`mtp_cy._aio.AsyncStream` to its end in one worker job; its Completion."""
    from mtp_cy._aio import collect_events
    return await collect_events(events)


async def _achunks(events, ch, first):
    try:
        for x in ch.start():
            yield x
        if first is not None:
            for x in ch.feed(first):
                yield x
            async for ev in events:
                for x in ch.feed(ev):
                    yield x
        for x in ch.end(events.completion):
            yield x
    finally:
        await events.aclose()


async def _aopen(events, ch):
    """Open an async stream (its first step: a slot, the prompt) before handing out its chunks, so that
    opening errors are raised by the awaited call and not by the first chunk."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise
    return _achunks(events, ch, first)


async def acreate_completion(engine, prompt: Union[str, Sequence[int]], *, stream: bool = False, **kwargs):
    """Async :func:`create_completion`: ``await acreate_completion(engine, prompt, ...)``.

    Returns the ``text_completion`` dict, or with ``stream=True`` an async iterator of
    chunk dicts; in both cases the call has been opened (slot taken, prompt processed, the first
    token sampled) when the await returns, so argument and opening errors are raised by the
    await.  The native steps run in worker threads (see :meth:`mtp_cy.Session.astream`);
    cancelling the awaiting task stops the call, and so does ``aclose()`` on the iterator."""
    plan = _CompletionPlan(engine, prompt, stream, kwargs, "acreate_completion")
    events = engine.astream_events(plan.prompt, **plan.opts)
    if not stream:
        return plan.result(await _drain(events))
    return await _aopen(events, plan.chunker(events))


async def acreate_chat_completion(engine, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
                                  **kwargs):
    """Async :func:`create_chat_completion` (see :func:`acreate_completion`)."""
    plan = _ChatPlan(engine, messages, stream, kwargs, "acreate_chat_completion")
    events = engine.achat_events(messages, **plan.chat_kw, **plan.opts)
    if not stream:
        return plan.result(await _drain(events))
    return await _aopen(events, plan.chunker(events))
