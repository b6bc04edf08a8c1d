"""Grammars and JSON schemas never crash or hang the process (issue: reliability).

Families that killed or hung the interpreter inside llama.cpp: deep nesting in GBNF (C stack
overflow), repetition bounds whose minimum exceeds the maximum (a ~2**64 loop with the GIL
held), deeply nested JSON schemas (a bare RecursionError), long chains of rules.  Every variant
must raise GrammarError (a ValueError) with its position, in bounded time, print nothing to
stderr and leave the session usable.  The variants and the fuzz run in a child process with a
time limit, so that a regression fails the test instead of killing or hanging the test run.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mtp_cy
from mtp_cy import _grammar_check as gc

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys
    import mtp_cy
    path, cases = sys.argv[1], json.load(open(sys.argv[2]))
    out = []
    def deep(n, key):
        s = {"type": "string"}
        for _ in range(n):
            s = {"type": "array", "items": s} if key == "items" else {"type": "object", "properties": {"a": s}}
        return s
    with mtp_cy.Model(path) as m, mtp_cy.Session(m, n_ctx=128, n_threads=1) as s:
        for kind, value in cases:
            if kind == "deep":          # built here: the test cannot send it as JSON
                kind, value = "schema", deep(*value)
            kw = {"grammar": value} if kind == "grammar" else {"json_schema": value}
            try:
                s.generate([1, 2], max_tokens=2, temp=0, **kw)
                res = ["ok", None, None, None]
            except mtp_cy.GrammarError as exc:
                res = ["GrammarError", str(exc), exc.line, exc.path]
            except Exception as exc:
                res = [type(exc).__name__, str(exc)[:300], None, None]
            # the session is usable after every case
            s.generate([1, 2], max_tokens=2, temp=0)
            res.append(True)
            out.append(res)
    print(json.dumps(out))
""")


def run_cases(sm, cases, tmp_path, timeout=240):
    f = tmp_path / "cases.json"
    f.write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHILD, str(sm.path), str(f)], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, f"the child died (rc {r.returncode}): {r.stderr[-3000:]}"
    # nothing on stderr: llama.cpp's lines go to the "mtp_cy" logger only
    assert r.stderr.strip() == "", r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def nest(n, inner='"a"'):
    return "(" * n + inner + ")" * n


DEEP = [
    ("grammar", "root ::= " + nest(MAXN)) for MAXN in (gc.MAX_NESTING + 1, 1000, 100_000)
] + [
    ("grammar", "root ::= \"x\" | " + nest(5000, '"a" | "b"*')),
    ("grammar", "root ::= item\nitem ::= " + nest(20000, "[a-z]+") + "\n"),
    ("grammar", "root ::= " + "(" * 3000),                            # unbalanced too
]
REPEAT = [
    ("grammar", 'root ::= "a"{5,2}'),
    ("grammar", 'root ::= [a-z]{10,3} "b"'),
    ("grammar", 'root ::= ("a" "b"){3,1}'),
    ("grammar", 'root ::= ("x" ("y"{2,1}))'),
    ("grammar", 'root ::= ( "x"{ 9 , 8 } )'),
    ("grammar", 'root ::= "a"{1999,1998}'),
    ("grammar", 'root ::= "a"{5000}'),
]
CHAINS = [
    ("grammar", "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x"\n' for i in range(3000)) + 'r3000 ::= "y"\n'),
    ("grammar", "root ::= r0\n" + "".join(f'r{i} ::= ("" | "z") r{i + 1}\n' for i in range(2000)) + 'r2000 ::= "y"\n'),
    ("grammar", 'root ::= root "a" | "b"'),
    ("grammar", 'root ::= x\nx ::= y "a"\ny ::= x | "b"'),
    ("grammar", 'root ::= x\nx ::= ""? x "a" | "b"'),
]
SYNTAX = [
    ("grammar", 'root ::= "unterminated'),
    ("grammar", "root ::= [a-"),
    ("grammar", 'root := "a"'),
    ("grammar", "root ::= undefined-rule"),
    ("grammar", 'root ::= "a" )'),
    ("grammar", 'root ::= "\\q"'),
    ("grammar", 'root ::= "\\x4"'),
    ("grammar", ""),
    ("grammar", "   \n# only a comment\n"),
    ("grammar", 'root ::= "a" ::= "b"'),
    ("grammar", "root ::= *"),
    ("grammar", 'root ::= ! "a"'),
]


def deep_schema(n, key="items"):
    """A schema n arrays (or objects) deep, built by the child process."""
    return ("deep", [n, key])


def deep_schema_text(n):
    return '{"type": "array", "items": ' * n + '{"type": "string"}' + "}" * n


SCHEMAS = [
    ("schema", {"type": "string", "minLength": 5, "maxLength": 2}),
    ("schema", {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 1}),
    ("schema", {"type": "object", "properties": {"a": {"type": "string", "minLength": 3, "maxLength": 1}}}),
    ("schema", {"type": "integer", "minimum": 10, "maximum": -10}),
    ("schema", {"type": "object", "minProperties": 3, "maxProperties": 1}),
    ("schema", {"type": "string", "minLength": "3"}),
    deep_schema(gc.MAX_SCHEMA_DEPTH + 1),
    deep_schema(3000),
    deep_schema(300, "properties"),
    ("schema", deep_schema_text(5000)),
    ("schema", "[" * 100_000),
    ("schema", "{not json"),
]


@pytest.fixture(scope="module")
def sm():
    from mtp_cy import synthetic
    return synthetic.cached_model(mtp=True, acceptance=0.75)


def test_pathological_grammars_and_schemas_raise_with_their_position(sm, tmp_path):
    cases = DEEP + REPEAT + CHAINS + SYNTAX + SCHEMAS
    got = run_cases(sm, cases, tmp_path)
    for (kind, value), (res, msg, line, path, usable) in zip(cases, got):
        kind = "schema" if kind == "deep" else kind
        shown = (kind, str(value)[:60])
        assert usable, shown
        assert res == "GrammarError", (shown, res, msg)
        if kind == "grammar":
            assert msg.startswith("invalid grammar"), msg
        if (kind, value) in REPEAT[:5]:
            assert "minimum exceeds the maximum" in msg and line == 1, msg
        if (kind, value) in DEEP[:3]:
            assert f"deeper than {gc.MAX_NESTING}" in msg and line == 1, msg
        if (kind, value) in SCHEMAS[:5]:
            assert "exceeds" in msg and path is not None, msg
    # positions are where the problem is
    assert got[len(DEEP)][2] == 1
    chain = got[len(DEEP) + len(REPEAT)]
    assert "at most" in chain[1] and chain[2] is not None
    assert "left recursion" in got[len(DEEP) + len(REPEAT) + 2][1]


def test_bounds_are_not_refusing_normal_grammars(sm, tmp_path):
    """Everything that is fine stays fine: llama.cpp's example grammars, the JSON-schema
    converter's output, nesting and chains up to the bounds, repetitions with m <= n."""
    cases = [("grammar", p.read_text()) for p in sorted((ROOT / "vendor" / "llama.cpp" / "grammars").glob("*.gbnf"))]
    cases += [
        ("grammar", "root ::= " + nest(gc.MAX_NESTING)),
        ("grammar", "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x"\n' for i in range(gc.MAX_CHAIN - 2))
         + f'r{gc.MAX_CHAIN - 2} ::= "y"\n'),
        ("grammar", 'root ::= "a"{2,5} "b"{3} "c"{0,} "d"{1,1}'),
        ("grammar", 'root ::= x "a"\nx ::= "b" x | ""'),      # right recursion is fine
        ("schema", {"type": "string", "minLength": 2, "maxLength": 2}),
        ("schema", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}),
        deep_schema(gc.MAX_SCHEMA_DEPTH),
        ("schema", {"type": "integer", "minimum": -5, "maximum": 5}),
    ]
    if not cases[0][1]:
        pytest.skip("llama.cpp's grammars/ not in the source tree")
    got = run_cases(sm, cases, tmp_path)
    for (kind, value), res in zip(cases, got):
        assert res[0] == "ok", (kind, str(value)[:80], res)


FUZZ_CHILD = textwrap.dedent("""
    import json, random, sys
    import mtp_cy
    path, seeds, n = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
    rng = random.Random(int(sys.argv[4]))
    alphabet = list('()[]{}|*+?."\\\\#:=^-, \\n0123456789abcxyz<>!') + ["::=", "root", "{3,1}", "{1,3}",
                                                                   "(((", ")))", "\\\\x", "[^", "\\"\\""]
    stats = {"ok": 0, "refused": 0}
    with mtp_cy.Model(path) as m, mtp_cy.Session(m, n_ctx=128, n_threads=1) as s:
        for i in range(n):
            text = rng.choice(seeds)
            for _ in range(rng.randint(1, 6)):
                op, at = rng.random(), rng.randint(0, len(text))
                if op < 0.4:
                    text = text[:at] + rng.choice(alphabet) + text[at:]
                elif op < 0.7:
                    text = text[:at] + text[at + rng.randint(1, 4):]
                elif op < 0.85:
                    j = rng.randint(0, len(text))
                    text = text[:at] + text[min(at, j):max(at, j)] * rng.randint(2, 50) + text[at:]
                else:
                    text = text[:at] + "(" * rng.randint(50, 3000) + text[at:]
            try:
                s.generate([1, 2], grammar=text, max_tokens=2, temp=0)
                stats["ok"] += 1
            except ValueError:
                stats["refused"] += 1
            except (mtp_cy.NativeError, mtp_cy.DecodeError):
                stats["refused"] += 1      # a grammar that reaches a dead end while sampling
        for i in range(n // 2):
            sch = {"type": rng.choice(["string", "array", "object", "integer"])}
            for k in rng.sample(["minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum",
                                 "minProperties", "maxProperties"], rng.randint(0, 4)):
                sch[k] = rng.choice([0, 1, 3, 7, 50, -1, "x", 2.5, None])
            for _ in range(rng.choice([0, 1, 5, 70, 500])):
                sch = {"type": "array", "items": sch} if rng.random() < 0.5 else \\
                    {"type": "object", "properties": {"k": sch}, "required": ["k"]}
            try:
                s.generate([1, 2], json_schema=sch, max_tokens=2, temp=0)
                stats["ok"] += 1
            except (ValueError, TypeError):
                stats["refused"] += 1
            except (mtp_cy.NativeError, mtp_cy.DecodeError):
                stats["refused"] += 1
        s.generate([1, 2], max_tokens=2, temp=0)
    print(json.dumps(stats))
""")


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_grammar_and_schema_fuzz(sm, tmp_path, seed):
    """Random mutations of valid grammars and random schemas: each one works or raises a
    ValueError; the child finishes within its time limit (no hang) and does not die."""
    seeds = [p.read_text() for p in sorted((ROOT / "vendor" / "llama.cpp" / "grammars").glob("*.gbnf"))]
    seeds += ['root ::= "a" | "b"', 'root ::= [a-z]+ ("," [a-z]+)*', 'root ::= x{2,4}\nx ::= "x" | "y"']
    f = tmp_path / "seeds.json"
    f.write_text(json.dumps(seeds))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", FUZZ_CHILD, str(sm.path), str(f), "300", str(seed)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, f"the child died (rc {r.returncode}): {r.stderr[-3000:]}"
    assert r.stderr.strip() == "", r.stderr[-2000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["ok"] > 10 and stats["refused"] > 10, stats


def test_check_grammar_positions_and_types():
    with pytest.raises(mtp_cy.GrammarError) as ei:
        gc.check_grammar('root ::= "a"\nitem ::= "b"{4,1}\n')
    assert (ei.value.line, ei.value.column) == (2, 13)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, mtp_cy.MTPError)
    with pytest.raises(TypeError):
        gc.check_grammar(b'root ::= "a"')
    with pytest.raises(mtp_cy.GrammarError, match="bytes; at most"):
        gc.check_grammar('root ::= "' + "a" * (gc.MAX_GRAMMAR_BYTES + 1) + '"')
    with pytest.raises(mtp_cy.GrammarError) as ei:
        gc.check_schema({"properties": {"a/b": {"minItems": 3, "maxItems": 1}}})
    assert ei.value.path == "/properties/a~1b"
    gc.check_grammar('root ::= "a"')          # fine


def test_grammar_error_reaches_the_logger_not_stderr(sm, caplog):
    """llama.cpp's parse error is in the exception and on the "mtp_cy" logger, nowhere else."""
    import logging
    with mtp_cy.Model(sm.path) as m, mtp_cy.Session(m, n_ctx=128, n_threads=1) as s:
        # a grammar our check accepts but llama.cpp's parser refuses (a token without a vocab
        # piece) still gives a clean error
        with caplog.at_level(logging.ERROR, logger="mtp_cy"):
            with pytest.raises(ValueError):
                s.generate([1, 2], grammar="root ::= <not-a-token>", max_tokens=2)
        assert any("grammar" in r.getMessage() or "token" in r.getMessage() for r in caplog.records)
