"""Checks of GBNF grammars and JSON schemas before llama.cpp sees them.

llama.cpp's grammar parser and sampler are recursive and trust their input: a grammar nested
deep enough overflows the C stack (the process dies with SIGSEGV), a repetition whose minimum
exceeds its maximum (``x{5,2}``) makes the parser loop ~2**64 times with the GIL held, and a long
chain of rules that each start with the next one recurses once per rule in every sampling step.
This module reads a grammar the way llama.cpp does (same tokens, same rules) and refuses, with
:class:`GrammarError` (a ``ValueError``) naming the line and column, whatever is malformed or
beyond these bounds:

* :data:`MAX_GRAMMAR_BYTES`: the grammar's size in UTF-8;
* :data:`MAX_NESTING`: parentheses nested in one rule;
* :data:`MAX_CHAIN`: rules entered one inside the other at the start of a match (the depth
  of llama.cpp's recursion when it advances the grammar); a rule that can start with itself
  (left recursion) is refused too, as llama.cpp refuses it;
* repetitions ``{m,n}`` with ``m <= n`` (llama.cpp's own limit: ``m`` at most 2000).

JSON schemas are checked as data (:func:`check_schema`): nesting depth (:data:`MAX_SCHEMA_DEPTH`)
and the ``min*`` / ``max*`` pairs, with the JSON pointer of the offending value.  The check is
linear in the input and runs in bounded time.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

from mtp_cy.errors import GrammarError

__all__ = ["GrammarError", "check_grammar", "check_schema", "schema_text",
           "MAX_GRAMMAR_BYTES", "MAX_NESTING", "MAX_CHAIN", "MAX_SCHEMA_DEPTH"]

MAX_GRAMMAR_BYTES = 4 << 20
MAX_NESTING = 100
MAX_CHAIN = 1000
MAX_REPETITION = 2000           # llama.cpp's MAX_REPETITION_THRESHOLD for the minimum
MAX_SCHEMA_DEPTH = 64


_NAME = re.compile(r"[a-zA-Z0-9-]+")       # llama.cpp's is_word_char
_INT = re.compile(r"[0-9]+")


class _Reader:
    """llama.cpp's GBNF syntax (llama-grammar.cpp's parse_* functions), position-aware."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def where(self, i: Optional[int] = None) -> Tuple[int, int]:
        i = self.i if i is None else i
        lo, hi = 0, len(self.line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.line_starts[mid] <= i:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, i - self.line_starts[lo] + 1

    def fail(self, msg: str, i: Optional[int] = None):
        line, col = self.where(i)
        raise GrammarError(msg, line, col)

    def space(self, newline_ok: bool):
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in " \t" or (newline_ok and c in "\r\n"):
                self.i += 1
            elif c == "#":
                while self.i < n and s[self.i] not in "\r\n":
                    self.i += 1
            else:
                break

    def name(self) -> str:
        m = _NAME.match(self.s, self.i)
        if not m:
            self.fail("expecting a rule name")
        self.i = m.end()
        return m.group(0)

    def char(self, end: Optional[str]) -> bool:
        """One (possibly escaped) character of a literal or class; False at the closing char."""
        s = self.s
        if self.i >= len(s):
            self.fail(f"unexpected end of input (missing closing {end!r})" if end else "unexpected end of input")
        c = s[self.i]
        if c == end:
            return False
        if c == "\\":
            self.i += 1
            if self.i >= len(s):
                self.fail("unexpected end of input after '\\'")
            e = s[self.i]
            hexlen = {"x": 2, "u": 4, "U": 8}.get(e)
            if hexlen:
                h = s[self.i + 1:self.i + 1 + hexlen]
                if len(h) != hexlen or any(ch not in "0123456789abcdefABCDEF" for ch in h):
                    self.fail(f"expecting {hexlen} hex digits after '\\{e}'")
                self.i += 1 + hexlen
                return True
            if e not in "tnr\"[]\\":
                self.fail(f"unknown escape '\\{e}'")
            self.i += 1
            return True
        self.i += 1
        return True


class _Rules:
    """The rules of one grammar: alternatives of element lists, as a graph for the checks."""

    def __init__(self):
        self.rules: Dict[str, List[List[tuple]]] = {}   # name -> alternatives -> elements
        self.where: Dict[str, Tuple[int, int]] = {}
        self.refs: List[Tuple[str, int]] = []           # (name, offset) of every reference
        self.n_anon = 0

    def anon(self) -> str:
        self.n_anon += 1
        return f"\0group{self.n_anon}"


def _parse(text: str) -> Tuple[_Reader, _Rules]:
    r, g = _Reader(text), _Rules()
    r.space(True)
    if r.i >= len(text):
        r.fail("the grammar is empty")
    while r.i < len(text):
        start = r.i
        name = r.name()
        r.space(False)
        if not text.startswith("::=", r.i):
            r.fail("expecting '::=' after the rule name")
        r.i += 3
        r.space(True)
        alts = _alternates(r, g, 0)
        if name in g.rules:
            g.rules[name].extend(alts)        # llama.cpp: a rule defined twice gets both
        else:
            g.rules[name] = alts
            g.where[name] = r.where(start)
        if r.i < len(text) and text[r.i] not in "\r\n":
            r.fail("expecting a newline or the end of the grammar")
        r.space(True)
    return r, g


def _alternates(r: _Reader, g: _Rules, depth: int) -> List[List[tuple]]:
    alts = [_sequence(r, g, depth)]
    while r.i < len(r.s) and r.s[r.i] == "|":
        r.i += 1
        r.space(True)
        alts.append(_sequence(r, g, depth))
    return alts


def _sequence(r: _Reader, g: _Rules, depth: int) -> List[tuple]:
    """Elements: ("lit", nullable) | ("ref", name) | ("group", name) and ("rep", elem, lo, hi)."""
    s, out = r.s, []
    nested = depth > 0
    while r.i < len(s):
        c = s[r.i]
        at = r.i
        if c == '"':
            r.i += 1
            n = 0
            while r.char('"'):
                n += 1
            r.i += 1
            out.append(("lit", n == 0))
        elif c == "[":
            r.i += 1
            if r.i < len(s) and s[r.i] == "^":
                r.i += 1
            while r.char("]"):
                if r.i + 1 < len(s) and s[r.i] == "-" and s[r.i + 1] != "]":
                    r.i += 1
                    r.char(None)                # the range's upper end
            r.i += 1
            out.append(("lit", False))
        elif c == "<" or c == "!":
            if c == "!":
                r.i += 1
                if r.i >= len(s) or s[r.i] != "<":
                    r.fail("expecting '<' (a token) after '!'")
            end = s.find(">", r.i)
            if end < 0:
                r.fail("expecting '>' to close a token")
            r.i = end + 1
            out.append(("lit", False))
        elif c == ".":
            r.i += 1
            out.append(("lit", False))
        elif _NAME.match(s, r.i):
            name = r.name()
            g.refs.append((name, at))
            out.append(("ref", name))
        elif c == "(":
            if depth + 1 > MAX_NESTING:
                r.fail(f"parentheses nested deeper than {MAX_NESTING} levels")
            r.i += 1
            r.space(True)
            name = g.anon()
            g.rules[name] = _alternates(r, g, depth + 1)
            g.where[name] = r.where(at)
            if r.i >= len(s) or s[r.i] != ")":
                r.fail("expecting ')' to close the group opened", at)
            r.i += 1
            out.append(("group", name))
        elif c in "*+?":
            if not out:
                r.fail(f"{c!r} without an item before it")
            r.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            out[-1] = ("rep", out[-1], lo, hi)
        elif c == "{":
            if not out:
                r.fail("'{' without an item before it")
            r.i += 1
            r.space(nested)
            m = _INT.match(s, r.i)
            if not m:
                r.fail("expecting an integer after '{'")
            lo = int(m.group(0))
            r.i = m.end()
            r.space(nested)
            hi: Optional[int] = lo
            if r.i < len(s) and s[r.i] == ",":
                r.i += 1
                r.space(nested)
                m = _INT.match(s, r.i)
                hi = None
                if m:
                    hi = int(m.group(0))
                    r.i = m.end()
                    r.space(nested)
            if r.i >= len(s) or s[r.i] != "}":
                r.fail("expecting '}' to close a repetition")
            r.i += 1
            if lo > MAX_REPETITION:
                r.fail(f"repetition {{{lo},...}}: at most {MAX_REPETITION} repetitions are allowed", at)
            if hi is not None and hi < lo:
                r.fail(f"repetition {{{lo},{hi}}}: the minimum exceeds the maximum", at)
            out[-1] = ("rep", out[-1], lo, hi)
        else:
            break
        r.space(nested)
    return out


def _elem_nullable(e, null: Dict[str, bool]) -> bool:
    """Whether element ``e`` can match the empty string, given the rules' nullability."""
    k = e[0]
    if k == "lit":
        return e[1]
    if k in ("ref", "group"):
        return null.get(e[1], False)
    return e[2] == 0 or _elem_nullable(e[1], null)   # rep


def _nullable(g: _Rules) -> Dict[str, bool]:
    null = {name: False for name in g.rules}
    changed = True
    while changed:
        changed = False
        for name, alts in g.rules.items():
            if not null[name] and any(all(_elem_nullable(e, null) for e in alt) for alt in alts):
                null[name] = changed = True
    return null


def _leading(g: _Rules, null: Dict[str, bool]) -> Dict[str, List[Tuple[str, int]]]:
    """name -> [(rule, extra depth)] the rule may start with (llama.cpp recurses into each)."""
    def targets(e, extra=0):
        if e[0] in ("ref", "group"):
            return [(e[1], extra)]
        if e[0] == "rep":
            inner = e[1]
            # S{m,n} becomes n-m nested helper rules; they start with one another only when
            # S can be empty
            chain = 1
            if _elem_nullable(inner, null):
                chain = (e[3] - e[2]) if e[3] is not None else 1
            return targets(inner, extra + max(chain, 1))
        return []

    out = {}
    for name, alts in g.rules.items():
        lead = []
        for alt in alts:
            for e in alt:
                lead.extend(targets(e))
                if not _elem_nullable(e, null):
                    break
        out[name] = lead
    return out


def check_grammar(text: str, root: str = "root") -> None:
    """Raise :class:`GrammarError` for a GBNF grammar llama.cpp cannot take safely.

    Syntax errors, undefined rules, a missing ``root``, parentheses nested deeper than
    :data:`MAX_NESTING`, chains of rules deeper than :data:`MAX_CHAIN`, left recursion,
    ``{m,n}`` with ``m > n`` and grammars over :data:`MAX_GRAMMAR_BYTES` are refused; the
    message names the line and column.  Returns ``None`` for a grammar it accepts."""
    if not isinstance(text, str):
        raise TypeError(f"grammar must be a GBNF str, got {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted")
    if "\0" in text:
        r = _Reader(text)
        r.fail("NUL character in the grammar", text.index("\0"))
    r, g = _parse(text)
    for name, at in g.refs:
        if name not in g.rules:
            r.fail(f"rule {name!r} is used but never defined", at)
    if root not in g.rules:
        raise GrammarError(f"no rule named {root!r} (the root rule, grammar_root={root!r})")
    null = _nullable(g)
    lead = _leading(g, null)
    # longest chain of leading references from every rule (iterative DFS; a cycle is left
    # recursion, which llama.cpp refuses -- after recursing through it)
    depth: Dict[str, int] = {}
    state: Dict[str, int] = {}                   # 1 on the path, 2 done
    for start in g.rules:
        if start in depth:
            continue
        stack = [(start, 0)]
        state[start] = 1
        while stack:
            name, k = stack[-1]
            edges = lead[name]
            if k < len(edges):
                stack[-1] = (name, k + 1)
                nxt = edges[k][0]
                st = state.get(nxt)
                if st == 1:
                    line, col = g.where.get(nxt, (None, None))
                    shown = nxt if not nxt.startswith("\0") else "a parenthesized group"
                    raise GrammarError(f"left recursion: {shown!r} can start with itself "
                                       "(llama.cpp does not support it)", line, col)
                if st is None:
                    state[nxt] = 1
                    stack.append((nxt, 0))
                continue
            d = 1 + max((depth[t] + extra for t, extra in edges), default=0)
            depth[name] = d
            state[name] = 2
            stack.pop()
            if d > MAX_CHAIN:
                line, col = g.where.get(name, (None, None))
                raise GrammarError(f"rules nested {d} deep at the start of a match (each starts with "
                                   f"the next); at most {MAX_CHAIN} are allowed", line, col)


def _pointer(path) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


_PAIRS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
          ("minimum", "maximum"), ("minContains", "maxContains"))


def check_schema(schema: Any) -> None:
    """Raise :class:`GrammarError` (with the JSON pointer) for a JSON schema (already parsed)
    nested deeper than :data:`MAX_SCHEMA_DEPTH` or with a ``min*`` above its ``max*``
    (``minLength``/``maxLength``, ``minItems``/``maxItems``, ``minProperties``/``maxProperties``,
    ``minimum``/``maximum``, ``minContains``/``maxContains``), or a bound that is not a number."""
    stack = [(schema, (), 0)]
    while stack:
        node, path, d = stack.pop()
        if d > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"nested deeper than {MAX_SCHEMA_DEPTH} levels", path=_pointer(path))
        if isinstance(node, dict):
            for lo_k, hi_k in _PAIRS:
                lo, hi = node.get(lo_k), node.get(hi_k)
                for k, v in ((lo_k, lo), (hi_k, hi)):
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                        raise GrammarError(f"{k} must be a number, got {v!r}", path=_pointer(path + (k,)))
                if lo is not None and hi is not None and lo > hi:
                    raise GrammarError(f"{lo_k} {lo!r} exceeds {hi_k} {hi!r}", path=_pointer(path))
            for k, v in node.items():
                if isinstance(v, (dict, list)):
                    stack.append((v, path + (k,), d + 1))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, (dict, list)):
                    stack.append((v, path + (i,), d + 1))


def schema_text(schema: Any) -> str:
    """A schema (a dict, or its JSON text) checked (:func:`check_schema`) and as JSON text."""
    if isinstance(schema, (bytes, bytearray)):
        schema = bytes(schema).decode("utf-8")
    if isinstance(schema, str):
        try:
            obj = json.loads(schema)
        except RecursionError:
            raise GrammarError(f"nested deeper than {MAX_SCHEMA_DEPTH} levels", path="") from None
        except ValueError as exc:
            raise GrammarError(f"not valid JSON: {exc}", path="") from None
    else:
        obj = schema
    check_schema(obj)
    try:
        return json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"schema must be a JSON-serializable dict or a JSON str: {exc}") from None
