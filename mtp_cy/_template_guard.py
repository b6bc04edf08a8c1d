"""Stack safety for chat templates rendered by llama.cpp's Jinja engine.

llama.cpp's Jinja parser and runtime are recursive (every nested bracket, block,
chained operator or macro call is a C++ stack frame or several) and have no depth
limit, so a template such as ``{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}``
or 5,000 nested parentheses overflows the stack and kills the interpreter.  A
GGUF's own template reaches the engine through ``chat()``, so this is reachable
from a downloaded file.

:func:`guard` makes every template safe before the engine sees it:

* it refuses, with a message, sources whose *static* structure is deeper than the
  engine can parse (bracket nesting and operator chains inside one tag, nesting
  of blocks);
* it bounds the *dynamic* recursion: every macro body is wrapped so that a call
  deeper than :data:`MAX_MACRO_DEPTH` raises the template's own
  ``raise_exception`` (a clean :class:`~mtp_cy.ChatTemplateError`) instead of
  recursing on.  The inserted tags produce no text and keep llama.cpp's
  ``trim_blocks``/``lstrip_blocks`` whitespace rules intact (each one copies the
  ``-`` whitespace control of the tag it sits next to), so the rendered text is
  exactly the same.

The renderer also runs on a thread with a large stack (``mtp_cy/_chat.h``), so
legitimate deep templates keep working.
"""
from __future__ import annotations

import re
from typing import List, Tuple

__all__ = ["guard", "TemplateTooDeep", "MAX_NESTING", "MAX_TAG_TOKENS", "MAX_MACRO_DEPTH", "MAX_SOURCE"]

#: deepest nesting of brackets inside one tag, and of blocks (if/for/macro/...)
MAX_NESTING = 128
#: most tokens (names, literals, operators) in one ``{{ }}`` / ``{% %}`` tag
MAX_TAG_TOKENS = 2048
#: deepest chain of macro calls in progress while rendering
MAX_MACRO_DEPTH = 200
#: longest template source
MAX_SOURCE = 4 * 1024 * 1024

_GUARD = "__mtp_cy_guard"
_OPENERS = {"if", "for", "macro", "call", "filter", "with", "generation", "autoescape"}
_TOKEN = re.compile(r"""[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|\*\*|//|==|!=|<=|>=|[-+*/%~|.,:()\[\]{}<>=!]""")
_TAG_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)")


class TemplateTooDeep(ValueError):
    """The template is nested or chained deeper than llama.cpp's engine can take."""


def _tags(src: str) -> List[Tuple[int, int, str]]:
    """``(start, end, kind)`` of every ``{{ }}`` / ``{% %}`` tag (kind "expr" / "stmt"),
    skipping comments and ``{% raw %}`` sections, string literals honoured."""
    out = []
    i, n = 0, len(src)
    while True:
        j = src.find("{", i)
        if j < 0 or j + 1 >= n:
            return out
        c = src[j + 1]
        if c == "#":
            k = src.find("#}", j + 2)
            i = n if k < 0 else k + 2
            continue
        if c not in "{%":
            i = j + 1
            continue
        close = "}}" if c == "{" else "%}"
        k = j + 2
        quote = None
        while k < n:
            ch = src[k]
            if quote:
                if ch == "\\":
                    k += 2
                    continue
                if ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif src.startswith(close, k):
                break
            k += 1
        if k >= n:
            return out            # unterminated: the engine reports the syntax error
        end = k + 2
        kind = "expr" if c == "{" else "stmt"
        out.append((j, end, kind))
        i = end
        if kind == "stmt" and _name(src, j, end) == "raw":
            m = re.compile(r"\{%-?\s*endraw\s*-?%\}").search(src, end)
            i = n if m is None else m.end()


def _inner(src: str, start: int, end: int) -> str:
    body = src[start + 2:end - 2]
    if body.startswith("-"):
        body = body[1:]
    if body.endswith("-"):
        body = body[:-1]
    return body


def _name(src: str, start: int, end: int) -> str:
    m = _TAG_NAME.match(_inner(src, start, end))
    return m.group(1) if m else ""


def _strip_strings(text: str) -> str:
    out, quote, i = [], None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
                out.append("0")
        elif ch in "'\"":
            quote = ch
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _check_tag(src: str, start: int, end: int) -> None:
    code = _strip_strings(_inner(src, start, end))
    depth = worst = 0
    for ch in code:
        if ch in "([{":
            depth += 1
            worst = max(worst, depth)
        elif ch in ")]}":
            depth -= 1
    if worst > MAX_NESTING:
        raise TemplateTooDeep(f"brackets nested {worst} deep in one tag (at character {start}); "
                              f"llama.cpp's template engine takes at most {MAX_NESTING}")
    n = len(_TOKEN.findall(code))
    if n > MAX_TAG_TOKENS:
        raise TemplateTooDeep(f"one tag (at character {start}) has {n} tokens; llama.cpp's template engine "
                              f"takes at most {MAX_TAG_TOKENS} in one expression")


def guard(src: str) -> str:
    """Check ``src`` and return it with its macro recursion bounded (see the module docstring).

    Raises :class:`TemplateTooDeep` (a ``ValueError``) for a source the engine cannot
    take safely."""
    if len(src) > MAX_SOURCE:
        raise TemplateTooDeep(f"the template is {len(src)} characters long; at most {MAX_SOURCE} are accepted")
    tags = _tags(src)
    inserts: List[Tuple[int, str]] = []
    depth = worst = 0
    macro_open: List[Tuple[int, int]] = []
    first_macro = None
    for start, end, kind in tags:
        _check_tag(src, start, end)
        if kind != "stmt":
            continue
        name = _name(src, start, end)
        inner = _inner(src, start, end)
        if name in _OPENERS or (name == "set" and "=" not in _strip_strings(inner)):
            depth += 1
            worst = max(worst, depth)
            if worst > MAX_NESTING:
                raise TemplateTooDeep(f"blocks nested {worst} deep (at character {start}); llama.cpp's template "
                                      f"engine takes at most {MAX_NESTING}")
            if name == "macro":
                macro_open.append((start, end))
                if first_macro is None:
                    first_macro = start
        elif name.startswith("end"):
            depth = max(0, depth - 1)
            if name == "endmacro" and macro_open:
                o_start, o_end = macro_open.pop()
                close_dash = src[o_end - 3] == "-"
                open_dash = src[start + 2] == "-"
                inserts.append((o_end, (
                    f"{{% if {_GUARD}.d >= {MAX_MACRO_DEPTH} %}}{{{{ raise_exception('chat template: macro "
                    f"calls nested deeper than {MAX_MACRO_DEPTH} (endless recursion?)') }}}}{{% endif %}}"
                    f"{{% set {_GUARD}.d = {_GUARD}.d + 1 {'-' if close_dash else ''}%}}")))
                inserts.append((start, f"{{{'%-' if open_dash else '%'} set {_GUARD}.d = {_GUARD}.d - 1 %}}"))
    if first_macro is None:
        return src
    # The counter, at the very beginning so that every macro sees it.  lstrip_blocks
    # strips the whitespace before a block tag only at the start of a line or of the
    # source: the newline after the counter keeps a leading indented tag on a line of
    # its own, and trim_blocks removes that newline again.
    head = f"{{% set {_GUARD} = namespace(d=0) %}}\n"
    inserts.append((0, head))
    out = []
    last = 0
    for pos, text in sorted(inserts, key=lambda t: t[0]):
        out.append(src[last:pos])
        out.append(text)
        last = pos
    out.append(src[last:])
    return "".join(out)
