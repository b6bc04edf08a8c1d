"""Drift guard: the .pxd declarations must match the vendored llama.cpp headers.

Every enum value declared in ``mtp_cy/includes/*.pxd`` must exist in the
header with the same value, and every struct field declared there must exist
in the header's struct, in the same relative order.
"""
import re
from pathlib import Path

import pytest

import mtp_cy

ROOT = Path(__file__).resolve().parents[1]
# the .pxd files of the mtp_cy under test (the source tree's in a developer
# install, the installed ones when testing a wheel)
INCLUDES = Path(mtp_cy.__file__).resolve().parent / "includes"


def llama_root():
    import os
    d = os.environ.get("MTP_CY_LLAMA_CPP_DIR")
    p = Path(d) if d else ROOT / "vendor" / "llama.cpp"
    if not (p / "include" / "llama.h").exists():
        pytest.skip(f"llama.cpp source not found at {p}")
    return p


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def header_enums(text):
    """Map enum name -> {member: value} for C enums (implicit values computed)."""
    out = {}
    for m in re.finditer(r"enum\s+(\w+)\s*(?::\s*\w+\s*)?\{(.*?)\}", strip_comments(text), re.S):
        name, body = m.group(1), m.group(2)
        members, cur = {}, -1
        for item in body.split(","):
            item = item.strip()
            if not item or item.startswith("#"):
                continue
            if "=" in item:
                k, v = (s.strip() for s in item.split("=", 1))
                try:
                    cur = int(eval(v, {}, dict(members)))  # noqa: S307 - header constants only
                except Exception:
                    cur = None
            else:
                k = item
                cur = None if cur is None else cur + 1
            members[k] = cur
        out[name] = members
    return out


def header_structs(text):
    """Map struct name -> ordered list of field names."""
    out = {}
    for m in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\n\s*\}\s*\w*\s*;", strip_comments(text), re.S):
        fields = []
        for stmt in m.group(2).split(";"):
            stmt = " ".join(stmt.split())
            if not stmt or "(" in stmt and not re.search(r"\(\s*\*\s*\w+\s*\)", stmt):
                continue
            fm = re.search(r"\(\s*\*\s*(\w+)\s*\)", stmt) or re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", stmt)
            if fm:
                fields.append(fm.group(1))
        out[m.group(1)] = fields
    return out


def pxd_blocks(path):
    """Yield (kind, c_name, [(member, value_or_None)]) for enums and structs in a .pxd."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*(?:cdef\s+)?(enum|struct)\s+(\w+)(?:\s+\"(\w+)\")?\s*:\s*$", line)
        if m:
            kind, cname = m.group(1), m.group(3) or m.group(2)
            indent = len(line) - len(line.lstrip())
            members = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                s = lines[i].strip()
                if s and s != "pass" and not s.startswith("#"):
                    if kind == "enum":
                        mm = re.match(r"(\w+)(?:\s*=\s*(-?\d+))?", s)
                        members.append((mm.group(1), int(mm.group(2)) if mm.group(2) else None))
                    else:
                        fm = re.search(r"\(\*\s*(\w+)\)", s) or re.search(r"(\w+)\s*$", s)
                        members.append((fm.group(1), None))
                i += 1
            yield kind, cname, members
            continue
        i += 1


HEADERS = {
    "llama.pxd": ["include/llama.h"],
    "ggml.pxd": ["ggml/include/ggml.h", "ggml/include/ggml-backend.h"],
    "common.pxd": ["common/common.h"],
    "gguf.pxd": ["ggml/include/gguf.h"],
}


@pytest.mark.parametrize("pxd", sorted(HEADERS))
def test_pxd_matches_header(pxd):
    root = llama_root()
    text = "\n".join((root / h).read_text() for h in HEADERS[pxd])
    enums, structs = header_enums(text), header_structs(text)
    checked = 0
    for kind, name, members in pxd_blocks(INCLUDES / pxd):
        if kind == "enum":
            assert name in enums, f"{pxd}: enum {name} not found in {HEADERS[pxd]}"
            for member, value in members:
                assert member in enums[name], f"{pxd}: {name}.{member} no longer exists upstream"
                if value is not None and enums[name][member] is not None:
                    assert enums[name][member] == value, \
                        f"{pxd}: {name}.{member} is {enums[name][member]} upstream, {value} here"
                checked += 1
        elif members:
            assert name in structs, f"{pxd}: struct {name} not found"
            fields = structs[name]
            last = -1
            for member, _ in members:
                assert member in fields, f"{pxd}: field {name}.{member} no longer exists upstream"
                idx = fields.index(member)
                assert idx > last, f"{pxd}: field {name}.{member} is out of order (upstream: {fields})"
                last = idx
                checked += 1
    assert checked > 0


def test_drift_guard_detects_a_change(tmp_path):
    """The guard itself must fail on a renamed enum value and a reordered field."""
    root = llama_root()
    text = (root / "include" / "llama.h").read_text()
    enums, structs = header_enums(text), header_structs(text)
    assert enums["llama_context_type"]["LLAMA_CONTEXT_TYPE_MTP"] == 1
    assert "LLAMA_CONTEXT_TYPE_XYZ" not in enums["llama_context_type"]
    f = structs["llama_context_params"]
    assert f.index("n_rs_seq") < f.index("ctx_type") < f.index("ctx_other")
    assert structs["llama_model_params"][-1] == "load_mtp"
