"""Chat templates cannot crash the interpreter (mtp_cy/_template_guard.py + the big-stack
render thread), and the guard never changes what a well-behaved template renders."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mtp_cy
from mtp_cy import _template_guard as tg

ROOT = Path(__file__).resolve().parents[1]

MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "what is 2+2?"}]
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "add numbers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "object", "properties": {
            "c": {"type": "string", "enum": ["x", "y"]}}}}}, "required": ["a"]}}}]

PATHOLOGICAL = {
    "macro recursion": "{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}",
    "mutual macro recursion": "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}{% endmacro %}{{ a(0) }}",
    "100,000 nested parentheses": "{{ " + "(" * 100000 + "1" + ")" * 100000 + " }}",
    "5,000 nested parentheses": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "nested lists": "{{ " + "[" * 20000 + "]" * 20000 + " }}",
    "nested ifs": "{% if true %}" * 20000 + "x" + "{% endif %}" * 20000,
    "long operator chain": "{{ " + " + ".join(["1"] * 100000) + " }}",
    "long filter chain": "{{ 'a'" + "|upper" * 100000 + " }}",
}


@pytest.fixture(scope="module")
def vocab_model(mtp_sm):
    m = mtp_cy.Model(mtp_sm.path, vocab_only=True)
    yield m
    m.close()


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_templates_raise_instead_of_crashing(mtp_sm, tmp_path, name):
    tpl = tmp_path / "template.jinja"
    tpl.write_text(PATHOLOGICAL[name])
    code = textwrap.dedent(f"""
        import mtp_cy
        m = mtp_cy.Model({str(mtp_sm.path)!r}, vocab_only=True)
        try:
            src = open({str(tpl)!r}).read()
            m.apply_chat_template([{{"role": "user", "content": "hi"}}], template=src)
        except mtp_cy.ChatTemplateError as e:
            print("ChatTemplateError", str(e)[:300].replace("\\n", " "))
        # the model still renders a normal template afterwards
        print(m.apply_chat_template([{{"role": "user", "content": "hi"}}], template="chatml"))
        print("OK")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    out = p.stdout.strip().splitlines()
    assert out[-1] == "OK" and out[0].startswith("ChatTemplateError"), p.stdout[-2000:]


def test_static_limits_are_reported(vocab_model):
    with pytest.raises(mtp_cy.ChatTemplateError, match="brackets nested 200 deep"):
        vocab_model.apply_chat_template(MSGS, template="{{ " + "(" * 200 + "1" + ")" * 200 + " }}")
    with pytest.raises(mtp_cy.ChatTemplateError, match="blocks nested 129 deep"):
        vocab_model.apply_chat_template(MSGS, template="{% if true %}" * 129 + "{% endif %}" * 129)
    with pytest.raises(mtp_cy.ChatTemplateError, match=r"macro calls nested deeper than 200"):
        vocab_model.apply_chat_template(MSGS, template=PATHOLOGICAL["macro recursion"])
    # brackets inside string literals do not count
    assert vocab_model.apply_chat_template(MSGS, template="{{ '" + "(" * 500 + "' }}") == "(" * 500


def test_bounded_recursion_still_works(vocab_model):
    t = ("{%- macro count(n) -%}{%- if n > 0 -%}{{ n }} {{ count(n - 1) }}{%- endif -%}{%- endmacro -%}"
         "{{ count(150) }}")
    out = vocab_model.apply_chat_template(MSGS, template=t)
    assert out.split() == [str(i) for i in range(150, 0, -1)]
    # the counter is per render: many calls in a row, each within the limit
    t2 = "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}.{% endmacro %}" + "{{ f(100) }}" * 5
    assert vocab_model.apply_chat_template(MSGS, template=t2) == "." * 505


WHITESPACE_CASES = [
    "{% macro f(x) %}\n  [{{ x }}]\n{% endmacro %}\n{{ f(1) }}|{{ f(2) }}",
    "{%- macro f(x) -%}\n  [{{ x }}]  \n{%- endmacro -%}\n{{ f(1) }}|{{ f(2) }}",
    "\n\n{% macro f(x) %} a{{ x }}b {% endmacro %}  {{ f(3) }}",
    "   {% macro f() %}\n   x\n   {% endmacro %}\n  {{ f() }}\n",
    "{% for m in messages %}{% macro g(y) %}<{{ y }}>{% endmacro %}{{ g(m.role) }}{% endfor %}",
    "{% macro e() %}{% endmacro %}[{{ e() }}]",
    "{% macro outer(n) %}{% macro inner(k) %}({{ k }}){% endmacro %}{{ inner(n) }}{% endmacro %}{{ outer(7) }}",
    "{# {% macro nope() %} #}{% macro f() %}z{% endmacro %}{{ f() }}{{ '{% macro' }}",
]


@pytest.mark.parametrize("src", WHITESPACE_CASES)
def test_guard_keeps_whitespace_exact(vocab_model, monkeypatch, src):
    guarded = vocab_model.apply_chat_template(MSGS, template=src)
    monkeypatch.setattr(mtp_cy._core, "_TEMPLATE_GUARD", False)
    plain = vocab_model.apply_chat_template(MSGS, template=src)
    assert guarded == plain
    assert tg.guard(src) != src      # there was something to guard


def _upstream_templates():
    d = ROOT / "vendor" / "llama.cpp" / "models" / "templates"
    if os.environ.get("MTP_CY_LLAMA_CPP_DIR"):
        d = Path(os.environ["MTP_CY_LLAMA_CPP_DIR"]) / "models" / "templates"
    return sorted(d.glob("*.jinja")) if d.is_dir() else []


@pytest.mark.parametrize("path", _upstream_templates(), ids=lambda p: p.stem)
def test_guard_renders_upstream_templates_identically(vocab_model, monkeypatch, path):
    """Every template shipped with the pinned llama.cpp renders exactly the same guarded
    and unguarded (with and without tools)."""
    src = path.read_text(encoding="utf-8")
    results = {}
    for guarded in (True, False):
        monkeypatch.setattr(mtp_cy._core, "_TEMPLATE_GUARD", guarded)
        out = []
        for kw in ({}, {"tools": TOOLS}):
            try:
                out.append(vocab_model.apply_chat_template(MSGS, template=src, **kw))
            except mtp_cy.ChatTemplateError as e:
                out.append(("error", str(e).split(":")[0]))
        results[guarded] = out
    assert results[True] == results[False]
