"""The type stubs (_core.pyi) describe the compiled extension: no missing or stale names,
the keyword options (and defaults) the extension accepts, and the return types that let a
type checker follow a stream to its result."""
import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mtp_cy
from mtp_cy import _core

STUB = Path(mtp_cy.__file__).with_name("_core.pyi")

STREAM_METHODS = ("stream", "stream_events", "generate", "complete", "astream", "astream_events", "agenerate")
CHAT_METHODS = ("chat", "chat_events", "complete_chat", "achat", "achat_events")
CHAT_EXTRA = {"template": None, "chat_template_kwargs": None, "enable_thinking": None, "tools": None}


def _stub_tree():
    return ast.parse(STUB.read_text())


def _stub_classes():
    out = {}
    for node in _stub_tree().body:
        if isinstance(node, ast.ClassDef):
            names = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            out[node.name] = (names, bases)
    return out


def _members(classes, name):
    names, bases = classes[name]
    names = set(names)
    for b in bases:
        if b in classes:
            names |= _members(classes, b)
    return names


def _method(cls, meth):
    classes = {n.name: n for n in _stub_tree().body if isinstance(n, ast.ClassDef)}
    return next(i for i in classes[cls].body
                if isinstance(i, (ast.FunctionDef, ast.AsyncFunctionDef)) and i.name == meth)


def _kwonly_defaults(cls, meth):
    """{name: default} of the keyword-only arguments written in the stub."""
    fn = _method(cls, meth)
    return {a.arg: ast.literal_eval(d) for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults)}


def test_stub_parses_and_py_typed_ships():
    assert (Path(mtp_cy.__file__).parent / "py.typed").is_file()
    _stub_tree()


def test_every_public_runtime_name_is_stubbed():
    classes = _stub_classes()
    funcs = {n.name for n in _stub_tree().body if isinstance(n, ast.FunctionDef)}
    for fname in ("init", "system_info", "build_info", "devices", "rpc_server", "json_schema_to_grammar"):
        assert fname in funcs
    for cname in ("Model", "Session", "MTP", "DraftPolicy", "ChatParser", "_Stream", "_Engine"):
        runtime = {k for k in dir(getattr(_core, cname)) if not k.startswith("_")}
        stubbed = _members(classes, cname)
        assert runtime - stubbed == set(), f"{cname}: not in the stub: {runtime - stubbed}"
        assert {k for k in stubbed if not k.startswith("_")} - runtime == set(), f"{cname}: stale stub names"


def test_module_level_names_match():
    """Public functions, classes and constants of the extension are in the stub, and the stub
    names nothing the extension lacks (type aliases and TypedDicts excepted)."""
    tree = _stub_tree()
    stubbed = set()
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            stubbed.add(n.name)
        elif isinstance(n, ast.AnnAssign):
            stubbed.add(n.target.id)
        elif isinstance(n, ast.ImportFrom) and n.module == "mtp_cy.errors":
            stubbed |= {a.asname or a.name for a in n.names}
    runtime = {k for k, v in vars(_core).items()
               if not k.startswith("_") and not inspect.ismodule(v) and k not in ("logger",)}
    assert runtime - stubbed == set(), f"not in the stub: {runtime - stubbed}"
    typing_only = {n.name for n in tree.body if isinstance(n, ast.ClassDef)
                   and any(isinstance(b, ast.Name) and (b.id == "TypedDict" or b.id.startswith("_") or
                                                       b.id in ("Stats", "CallStats", "_DeviceBase"))
                           for b in n.bases)}
    stale = {k for k in stubbed if not k.startswith("_")} - runtime - typing_only
    assert stale == set(), f"stale stub names: {stale}"


def _generation_options():
    """{name: default} of the stub's GenerationOptions TypedDict (each key's default is
    written in its comment, ``# default X``)."""
    import io
    import tokenize
    src = STUB.read_text()
    cls = next(n for n in _stub_tree().body if isinstance(n, ast.ClassDef) and n.name == "GenerationOptions")
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    out = {}
    for item in cls.body:
        if isinstance(item, ast.AnnAssign):
            c = comments.get(item.lineno, "")
            assert c.startswith("# default "), (item.target.id, c)
            out[item.target.id] = ast.literal_eval(c[len("# default "):].split(" (")[0])
    return out


def test_stubbed_options_match_runtime_defaults():
    """The generation options are written once in the stub (the GenerationOptions TypedDict),
    exactly the ones the extension accepts, with the extension's defaults; every generating
    method takes them as ``**options: Unpack[GenerationOptions]``."""
    assert _generation_options() == _core.STREAM_DEFAULTS
    for meth in STREAM_METHODS + CHAT_METHODS:
        fn = _method("_Engine", meth)
        assert fn.args.kwarg is not None and ast.unparse(fn.args.kwarg.annotation) == "Unpack[GenerationOptions]", meth
    for meth in STREAM_METHODS:
        assert _kwonly_defaults("_Engine", meth) == {}, meth
    for meth in CHAT_METHODS:
        assert _kwonly_defaults("_Engine", meth) == CHAT_EXTRA, meth
    # positional parameters: only the prompt / messages
    for meth in STREAM_METHODS + CHAT_METHODS:
        assert [a.arg for a in _method("_Engine", meth).args.args] in (["self", "prompt"], ["self", "messages"])
    assert _kwonly_defaults("Session", "__init__") == _core.CONTEXT_DEFAULTS
    mtp = _kwonly_defaults("MTP", "__init__")
    assert {k: v for k, v in mtp.items() if k in _core.CONTEXT_OPTIONS} == _core.CONTEXT_DEFAULTS
    assert set(mtp) - set(_core.CONTEXT_OPTIONS) == {"n_draft", "p_min", "n_draft_max", "spec_sampling"}
    assert (mtp["n_draft"], mtp["p_min"], mtp["n_draft_max"], mtp["spec_sampling"]) == (3, 0.0, None, None)


def test_mtp_defaults_written_in_the_stub_are_the_runtime_ones(mtp_model):
    with mtp_cy.MTP(mtp_model, n_ctx=64, n_threads=1) as m:
        assert (m.n_draft, m.p_min, m.n_draft_max) == (3, 0.0, 3)
    with mtp_cy.MTP(mtp_model, n_ctx=64, n_threads=1, n_draft="auto") as m:
        assert (m.n_draft, m.n_draft_max) == ("auto", 4)


def test_return_types():
    def ret(cls, meth):
        return ast.unparse(_method(cls, meth).returns)
    assert ret("_Engine", "stream") == ret("_Engine", "chat") == "_Stream[str]"
    assert ret("_Engine", "stream_events") == ret("_Engine", "chat_events") == "_Stream[Event]"
    assert ret("_Engine", "complete") == ret("_Engine", "complete_chat") == "Completion"
    assert ret("_Engine", "astream") == "AsyncStream[str]"
    for prop in ("finish_reason", "stop_reason", "stop_string", "completion", "chat_parser"):
        assert ret("_Stream", prop).startswith("Optional["), prop
    assert ret("_Stream", "completion") == "Optional[Completion]"
    assert ret("MTP", "n_draft") == "Union[int, Literal['auto']]"


def test_a_type_checker_follows_a_stream_to_its_result(tmp_path):
    """mypy --strict accepts typical code (when mypy is installed): stream() items are str,
    .finish_reason / .stop_reason / .stop_string / .completion type-check, and so on."""
    pytest.importorskip("mypy")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent("""
        from typing import Any, Dict, Iterator, Literal, Optional, Union
        from typing_extensions import assert_type
        import mtp_cy

        def f(s: mtp_cy.Session, m: mtp_cy.MTP) -> None:
            it = s.stream("x", max_tokens=None, prompt_timeout=5.0, logprobs=True, top_logprobs=2,
                          json_schema={"type": "object"}, emit_stats_every=4)
            for piece in it:
                assert_type(piece, str)
            fr: Optional[str] = it.finish_reason
            sr: Optional[str] = it.stop_reason
            ss: Optional[str] = it.stop_string
            c = it.completion
            assert_type(c, Optional[mtp_cy.Completion])
            if c is not None:
                n: int = c.usage.cached_tokens
                t: Optional[str] = c.reasoning
            for e in m.stream_events([1, 2], emit_stats_every=3):
                if e[0] == "token":
                    tid: int = e[1]
            assert_type(m.complete("x", max_tokens=3), mtp_cy.Completion)
            assert_type(s.complete_chat([{"role": "user", "content": "x"}], enable_thinking=False),
                        mtp_cy.Completion)
            assert_type(s.create_chat_completion([{"role": "user", "content": "hi"}], temperature=0),
                        Dict[str, Any])
            assert_type(s.create_completion("x", stream=True), Iterator[Dict[str, Any]])
            m2 = mtp_cy.MTP(s.model, n_draft="auto", n_draft_max=4, p_min=0.1)
            assert_type(m2.n_draft, Union[int, Literal["auto"]])
            line: str = m2.print_stats()
            k: int = m2.n_draft_max
            p: float = m2.p_min
            m2.reset_policy()
            s.clear_cache()
            g: str = mtp_cy.json_schema_to_grammar({"type": "object"})
            mtp_cy.DraftPolicy(4).observe(2, 1, verify_us=10.0)
            vo: bool = s.model.vocab_only
            cp: Optional[mtp_cy.ChatParser] = s.chat([{"role": "user", "content": "x"}]).chat_parser
            err: type[mtp_cy.MTPError] = mtp_cy.NativeError
            s.stream("x", no_such_option=1)  # type: ignore[call-arg]
    """))
    env = dict(os.environ, MYPYPATH=str(Path(mtp_cy.__file__).parent.parent))
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                        "--cache-dir", str(tmp_path / "cache"), "--warn-unused-ignores", str(snippet)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# `cdef readonly` attributes of the extension types: Cython gives them no docstring
# (documented in their class's docstring instead)
CDEF_ATTRIBUTES = {("Model", "path"), ("Model", "rpc_servers"), ("_Engine", "model"),
                   ("_Engine", "n_ctx"), ("_Engine", "n_seq")}


def test_public_names_have_docstrings():
    for obj in (mtp_cy.Model, mtp_cy.Session, mtp_cy.MTP, mtp_cy.DraftPolicy, mtp_cy.ChatParser,
                mtp_cy.Completion, mtp_cy.Usage, mtp_cy.TokenLogprob, _core._Stream, _core._Engine,
                mtp_cy.init, mtp_cy.system_info, mtp_cy.devices):
        assert inspect.getdoc(obj), obj
        if inspect.isclass(obj):
            for k, v in vars(obj).items():
                if (obj.__name__, k) in CDEF_ATTRIBUTES:
                    continue
                if not k.startswith("_") and (callable(getattr(obj, k, None)) or isinstance(v, property)
                                              or inspect.isgetsetdescriptor(v)):
                    assert inspect.getdoc(getattr(obj, k) if callable(getattr(obj, k, None)) else v), \
                        f"{obj.__name__}.{k}"
    for name in mtp_cy.__all__:
        obj = getattr(mtp_cy, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            assert inspect.getdoc(obj), name
    from mtp_cy import openai_compat, server
    for mod in (openai_compat, server):
        assert inspect.getdoc(mod)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj):
                assert inspect.getdoc(obj), (mod.__name__, name)
            if inspect.isclass(obj):
                for k, v in vars(obj).items():
                    if not k.startswith("_") and (callable(v) or isinstance(v, property)):
                        assert inspect.getdoc(getattr(obj, k)), (mod.__name__, name, k)
