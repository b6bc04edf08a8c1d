"""The type stubs (_core.pyi) describe the compiled extension: no missing or stale names."""
import ast
import inspect
from pathlib import Path

import mtp_cy
from mtp_cy import _core

STUB = Path(mtp_cy.__file__).with_name("_core.pyi")


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


def test_stub_parses_and_py_typed_ships():
    assert (Path(mtp_cy.__file__).parent / "py.typed").is_file()
    _stub_tree()


def test_every_public_runtime_name_is_stubbed():
    classes = _stub_classes()
    funcs = {n.name for n in _stub_tree().body if isinstance(n, ast.FunctionDef)}
    for fname in ("init", "system_info", "build_info", "devices", "rpc_server"):
        assert fname in funcs
    for cname in ("Model", "Session", "MTP"):
        runtime = {k for k in dir(getattr(_core, cname)) if not k.startswith("_")}
        stubbed = _members(classes, cname)
        assert runtime - stubbed == set(), f"{cname}: not in the stub: {runtime - stubbed}"
        assert {k for k in stubbed if not k.startswith("_")} - runtime == set(), f"{cname}: stale stub names"


def test_stubbed_options_match_runtime_defaults():
    """The keyword options written in the stub are exactly the ones the extension accepts."""
    classes = {n.name: n for n in _stub_tree().body if isinstance(n, ast.ClassDef)}

    def kwonly(cls, meth):
        fn = next(i for i in classes[cls].body if isinstance(i, ast.FunctionDef) and i.name == meth)
        return {a.arg for a in fn.args.kwonlyargs} | {a.arg for a in fn.args.args[2:]}
    stream_opts = set(_core.STREAM_OPTIONS)
    for meth in ("stream", "generate", "stream_events"):
        assert kwonly("_Engine", meth) - {"emit_stats_every"} == stream_opts, meth
    assert kwonly("Session", "__init__") == set(_core.CONTEXT_OPTIONS)
    assert kwonly("MTP", "__init__") == set(_core.CONTEXT_OPTIONS) | {"n_draft"}


def test_public_names_have_docstrings():
    for obj in (mtp_cy.Model, mtp_cy.Session, mtp_cy.MTP, mtp_cy.init, mtp_cy.system_info, mtp_cy.devices):
        assert inspect.getdoc(obj), obj
        if inspect.isclass(obj):
            for k, v in vars(obj).items():
                if not k.startswith("_") and callable(getattr(obj, k, None)):
                    assert inspect.getdoc(getattr(obj, k)), f"{obj.__name__}.{k}"
    for name in mtp_cy.__all__:
        obj = getattr(mtp_cy, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name
