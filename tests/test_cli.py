"""The command line (python -m mtp_cy ...) and the shared benchmark helper."""
import subprocess
import sys

import pytest

import mtp_cy
from mtp_cy import __main__ as cli
from mtp_cy.bench import format_table, measure
from conftest import prompt_of


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mtp_cy", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_demo_streams_and_checks_itself(mtp_sm):
    r = run_cli("demo", "--max-tokens", "40", "--n-draft", "3")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "identical to plain greedy text" in out and "NO" not in out
    assert "statistics equal the oracle" in out
    assert "acceptance rate" in out and "tokens emitted" in out
    # the generated text is the synthetic model's continuation
    words = set(mtp_sm.words)
    first = out.splitlines()[0].split()
    assert len(first) == 40 and all(" " + w in words for w in first)
    assert "prompt:" in r.stderr


def test_live_view_redraws_stats_line(mtp_model, mtp_sm):
    import io
    import re
    with mtp_cy.MTP(mtp_model, n_draft=2, n_ctx=256) as m:
        buf = io.StringIO()
        view = cli.LiveView(m, out=buf, live=True)
        view.width = 70
        pieces = list(m.stream(prompt_of(mtp_sm, 2), max_tokens=60, temp=0))
        for p in pieces:
            view.piece(p)
        view.finish()
    s = buf.getvalue()
    assert "\x1b[A" in s and "tok/s" in s and "accepted" in s
    # replay the output on a virtual screen: text rows fit the width, then the stats row
    screen, row = [""], 0
    for tok in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", s):
        if tok == "\n":
            row += 1
            screen += [""] * (row + 1 - len(screen))
        elif tok == "\x1b[A":
            row -= 1
        elif tok == "\x1b[K" or tok == "\r":
            if tok == "\x1b[K":
                screen[row] = ""
        elif not tok.startswith("\x1b"):
            screen[row] += tok
    lines = [ln for ln in screen if ln]
    assert lines[-1].startswith("[60 tok") and "accepted" in lines[-1]
    assert all(len(ln) <= 70 for ln in lines[:-1])
    assert " ".join(lines[:-1]).split() == "".join(pieces).split()


def test_run_command(mtp_sm, plain_sm):
    r = run_cli("run", str(mtp_sm.path), "the sea", "--temp", "0", "--max-tokens", "12", "--n-ctx", "128")
    assert r.returncode == 0, r.stderr
    p = mtp_sm.encode("the sea")
    assert r.stdout.rstrip("\n") == mtp_sm.predict(p, 12, 3, n_ctx=128).text
    assert "acceptance rate" in r.stderr
    r = run_cli("run", str(plain_sm.path), "the sea", "--temp", "0", "--max-tokens", "5", "-q")
    assert r.returncode == 0 and r.stdout.rstrip("\n") == plain_sm.greedy(plain_sm.encode("the sea"), 5).text
    r = run_cli("run", str(mtp_sm.path), "the sea", "--temp", "0.7", "--seed", "3", "--max-tokens", "8", "-q")
    r2 = run_cli("run", str(mtp_sm.path), "the sea", "--temp", "0.7", "--seed", "3", "--max-tokens", "8", "-q")
    assert r.returncode == 0 and r.stdout == r2.stdout


def test_cli_errors_are_clean(tmp_path):
    r = run_cli("run", str(tmp_path / "missing.gguf"), "hi")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = run_cli("demo", "--n-draft", "0")
    assert r.returncode == 2 and ">= 1" in r.stderr
    r = run_cli()
    assert r.returncode == 2


def test_info_command():
    r = run_cli("info")
    assert r.returncode == 0
    assert mtp_cy.llama_cpp_commit in r.stdout and "CPU" in r.stdout


def test_bench_command(mtp_sm):
    r = run_cli("bench", str(mtp_sm.path), "--max-tokens", "16", "--repeats", "1", "--n-draft", "1,3", "-q")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("plain") for ln in lines)
    assert any(ln.startswith("mtp-1") for ln in lines) and any(ln.startswith("mtp-3") for ln in lines)


def test_measure_rows_are_exact(mtp_model, mtp_sm):
    p = prompt_of(mtp_sm, 3)
    rows = measure(mtp_model, p, max_tokens=20, n_drafts=(2, 3), repeats=2, n_threads=1)
    assert [r.name for r in rows] == ["plain", "mtp-2", "mtp-3"]
    for r in rows:
        assert r.tokens == 20 and len(r.runs) == 2 and r.decode_tok_s > 0
        assert r.text == mtp_sm.greedy(p, 20).text
        if r.n_draft:
            want = mtp_sm.predict(p, 20, r.n_draft, n_ctx=3 + 20 + 16)
            assert (r.iters, r.drafts_generated, r.drafts_accepted) == \
                   (want.iters, want.drafts_generated, want.drafts_accepted)
    table = format_table(rows, extra=[{"name": "native", "decode_tok_s": 100.0}])
    assert "mtp-3" in table and "native" in table
    with pytest.raises(ValueError):
        measure(mtp_model, p, repeats=0)


def test_progress_while_waiting(monkeypatch):
    """The demo shows how long the model build has been running (on a terminal: one line that
    updates itself and is cleared at the end) and passes the result or the error through."""
    import io
    import time
    from mtp_cy import __main__ as main

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(main.sys, "stderr", err)
    assert main._with_progress(lambda: (time.sleep(0.5), 42)[1], "building the model", every=0.1) == 42
    out = err.getvalue()
    assert "\rbuilding the model ... 0 s" in out.replace("\x1b[K", "") and out.endswith("\r\x1b[K")
    quiet = Tty()
    monkeypatch.setattr(main.sys, "stderr", quiet)
    assert main._with_progress(lambda: (time.sleep(0.3), 1)[1], "x", quiet=True, every=0.1) == 1
    assert quiet.getvalue() == ""

    def boom():
        raise KeyError("nope")
    with pytest.raises(KeyError):
        main._with_progress(boom, "y", every=0.1)
