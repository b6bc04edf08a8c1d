# Chat templates: validation of the Python side (messages, tools, template
# arguments) before llama.cpp's own engine (common/chat.h, jinja) renders them.
# Model.apply_chat_template (in _model.pxi) uses these helpers.

from collections.abc import Mapping as _Mapping

_MSG_STR_KEYS = ("reasoning_content", "name", "tool_call_id")
_RESERVED_TEMPLATE_ARGS = ("messages", "add_generation_prompt")


cdef bytes _chat_messages_json(messages):
    """Validate ``messages`` (OpenAI style) and return them as JSON for common_chat_msgs_parse_oaicompat."""
    if isinstance(messages, (str, bytes, bytearray, _Mapping)):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts, "
                        f"got {type(messages).__name__}")
    try:
        msgs = list(messages)
    except TypeError:
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts, "
                        f"got {type(messages).__name__}") from None
    if not msgs:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, _Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role' (e.g. 'system', 'user', 'assistant', 'tool')")
        role = m["role"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty str, got {role!r}")
        if "content" not in m and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}] (role {role!r}) has no 'content'")
        d = {"role": role}
        if "content" in m:
            content = m["content"]
            if content is None or isinstance(content, str):
                d["content"] = content
            elif isinstance(content, (list, tuple)):
                parts = []
                for j, part in enumerate(content):
                    if (not isinstance(part, _Mapping) or part.get("type") != "text"
                            or not isinstance(part.get("text"), str)):
                        raise ValueError(f"messages[{i}]['content'][{j}] must be a text part "
                                         f"{{'type': 'text', 'text': str}}, got {part!r:.80}")
                    parts.append({"type": "text", "text": part["text"]})
                d["content"] = parts
            else:
                raise ValueError(f"messages[{i}]['content'] must be a str, None or a list of text parts, "
                                 f"got {type(content).__name__}")
        for key in _MSG_STR_KEYS:
            if key in m and m[key] is not None:
                if not isinstance(m[key], str):
                    raise ValueError(f"messages[{i}]['{key}'] must be a str, got {type(m[key]).__name__}")
                d[key] = m[key]
        if m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, (list, tuple)):
                raise ValueError(f"messages[{i}]['tool_calls'] must be a list, got {type(calls).__name__}")
            tcs = []
            for j, tc in enumerate(calls):
                fn = tc.get("function") if isinstance(tc, _Mapping) else None
                if (not isinstance(fn, _Mapping) or not isinstance(fn.get("name"), str)
                        or tc.get("type", "function") != "function"):
                    raise ValueError(f"messages[{i}]['tool_calls'][{j}] must be "
                                     "{'type': 'function', 'function': {'name': str, 'arguments': str | dict}}")
                args = fn.get("arguments", {})
                if not isinstance(args, (str, _Mapping)):
                    raise ValueError(f"messages[{i}]['tool_calls'][{j}]['function']['arguments'] must be "
                                     f"a JSON str or a dict, got {type(args).__name__}")
                call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
                if tc.get("id") is not None:
                    call["id"] = str(tc["id"])
                tcs.append(call)
            d["tool_calls"] = tcs
        out.append(d)
    try:
        return json.dumps(out, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"messages are not JSON-serializable: {exc}") from None


cdef bytes _chat_tools_json(tools):
    if tools is None:
        return b""
    if isinstance(tools, (str, bytes, _Mapping)) or not isinstance(tools, (list, tuple)):
        raise TypeError(f"tools must be a list of OpenAI-style tool dicts, got {type(tools).__name__}")
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, _Mapping) else None
        if not isinstance(fn, _Mapping) or t.get("type") != "function" or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{j}] must be {{'type': 'function', 'function': {{'name': str, "
                             f"'description': str, 'parameters': {{...}}}}}}")
    try:
        return json.dumps(list(tools), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tools are not JSON-serializable: {exc}") from None


cdef tuple _chat_template_args(dict kwargs):
    """Split extra template arguments into (tools json, enable_thinking, {name: json text})."""
    kw = dict(kwargs)
    tools = _chat_tools_json(kw.pop("tools", None))
    enable_thinking = True
    for name in _RESERVED_TEMPLATE_ARGS:
        if name in kw:
            raise TypeError(f"{name!r} cannot be passed as a template argument")
    if "enable_thinking" in kw:
        v = kw["enable_thinking"]
        if not isinstance(v, bool):
            raise TypeError(f"enable_thinking must be True or False, got {v!r}")
        enable_thinking = v
    m = {}
    for k, v in kw.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"chat template argument names must be non-empty str, got {k!r}")
        try:
            text = json.dumps(v, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"chat template argument {k!r} must be JSON-serializable: {exc}") from None
        m[k.encode("utf-8")] = text.encode("utf-8")
    return tools, enable_thinking, m


cdef class ChatParser:
    """Parses a model's reply to a rendered conversation into content, reasoning and tool
    calls, with llama.cpp's own chat parser (the one ``llama-server`` uses), set up for
    the template and the options the conversation was rendered with.

    Made by :meth:`Session.chat` / :meth:`MTP.chat` (``stream.chat_parser``) and the
    OpenAI-style chat methods; :meth:`parse` can also be called on any text.
    """
    cdef mtp_cy_chat_parser * p

    def __cinit__(self):
        self.p = mtp_cy_chat_parser_new()

    def __dealloc__(self):
        mtp_cy_chat_parser_free(self.p)
        self.p = NULL

    @property
    def format(self):
        """llama.cpp's name of the reply format it recognised for the template (e.g. ``"peg-native"``)."""
        return self.p.format_name.decode("utf-8", "replace")

    @property
    def additional_stops(self):
        """Stop strings the template's format asks for (besides the end-of-turn token)."""
        return [x.decode("utf-8", "replace") for x in self.p.additional_stops]

    def parse(self, text, partial=False):
        """The reply ``text`` as an OpenAI-style assistant message dict: ``role``,
        ``content`` (``None`` when empty), and ``reasoning_content`` / ``tool_calls`` when
        the model produced them.  ``partial=True`` for a reply still being generated."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        cdef string t = (<str>text).encode("utf-8")
        cdef string out
        cdef bint part = bool(partial)
        try:
            with nogil:
                out = mtp_cy_chat_parse(self.p, t, part)
        except Exception as exc:
            raise ChatTemplateError(f"the chat parser failed on this reply: {exc}") from None
        return json.loads(out.decode("utf-8", "replace"))


def json_schema_to_grammar(schema):
    """A GBNF grammar that only admits JSON documents valid for ``schema`` (a dict, or its
    JSON text), with llama.cpp's converter (``common/json-schema-to-grammar``).

    Raises :class:`GrammarError` (a ``ValueError``) for a schema the converter does not accept,
    one nested deeper than 64 levels or with a ``min*`` above its ``max*`` (with the JSON
    pointer of the offending part), ``TypeError`` for one that is not JSON."""
    schema = _grammar_check.schema_text(schema)
    cdef string s = (<str>schema).encode("utf-8")
    cdef string out
    try:
        with nogil:
            out = mtp_cy_json_schema_to_grammar(s)
    except Exception as exc:
        raise GrammarError(str(exc), path="") from None
    return out.decode("utf-8")
