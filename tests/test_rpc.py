"""llama.cpp's RPC backend: a model split across this process and rpc-server processes.

Every server is a real ``python -m mtp_cy rpc-server`` process on 127.0.0.1 (never
another address), started and stopped (kill + wait) by the fixtures of this file,
also when a test fails.  Expectations come from the synthetic model's oracle and
from the same model run locally.
"""
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import mtp_cy
from mtp_cy import __main__ as cli
from conftest import prompt_of

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
COUNTERS = ("iters", "drafts_generated", "drafts_accepted", "tokens_emitted")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="mtp_cy's RPC connection guard needs POSIX sockets")


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# On Linux the servers also die with the test process, should it itself be killed (the
# fixtures cannot stop them then): PR_SET_PDEATHSIG, set before exec-ing the command.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
                    "os.getppid() == int(sys.argv[1]) or os._exit(1); "
                    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def server_command(*args):
    cmd = [sys.executable, "-m", "mtp_cy", "rpc-server", *args]
    if sys.platform.startswith("linux"):
        return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid())] + cmd[1:]
    return cmd


class Server:
    """One ``python -m mtp_cy rpc-server`` process on 127.0.0.1.

    It serves this machine's CPU (``--device CPU``), also where there is a GPU: these tests
    check mtp_cy's side of RPC, and upstream's RPC client claims that a server supports every
    operation (ggml_backend_rpc_device_supports_op), so a GPU server would have to run ops
    its backend may lack for the synthetic models (flash attention with 32-wide heads on
    CUDA, for one) and abort.  A CPU server runs everything the client sends.
    """

    def __init__(self, logdir, port=None, args=()):
        self.port = port or free_port()
        self.endpoint = f"{HOST}:{self.port}"
        self.log = Path(logdir) / f"rpc-server-{self.port}.log"
        self._out = open(self.log, "wb")
        if "--device" not in args:
            args = ("--device", "CPU", *args)
        self.proc = subprocess.Popen(
            server_command("--host", HOST, "--port", str(self.port), "--threads", "1", *args),
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=child_env())

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rpc-server exited with {self.proc.returncode}: {self.output()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"rpc-server on port {self.port} did not start: {self.output()}")

    def output(self):
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Stop the process (``sig``, then SIGKILL after ``timeout``); return its exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.poll() is None:
                self.proc.kill()
        rc = self.proc.wait()
        self._out.close()
        return rc


@pytest.fixture
def start_server(tmp_path):
    """Start rpc-server processes; every one is stopped (SIGKILL + wait) when the test ends."""
    started = []

    def start(**kw):
        s = Server(tmp_path, **kw)
        started.append(s)
        return s.wait_ready()
    yield start
    for s in started:
        s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def _server_pool(tmp_path_factory):
    """Two rpc-server processes shared by the tests of this module."""
    d = tmp_path_factory.mktemp("rpc")
    started = []
    try:
        for _ in range(2):
            started.append(Server(d))
        for s in started:
            s.wait_ready()
        yield started
    finally:
        for s in started:
            s.stop(signal.SIGKILL)


@pytest.fixture
def servers(_server_pool):
    """The two shared servers, alive.  One that dies during a test fails that test (with the
    server's output) and is replaced, so that it does not take the following tests with it."""
    for i, s in enumerate(_server_pool):
        if not s.alive():
            s.stop()
            _server_pool[i] = Server(s.log.parent).wait_ready()
    yield list(_server_pool)
    dead = [s for s in _server_pool if not s.alive()]
    if dead:
        pytest.fail("rpc-server died during this test:\n" +
                    "\n".join(f"--- {s.endpoint}:\n{s.output()[-4000:]}" for s in dead))


def counters(st):
    return {k: st[k] for k in COUNTERS}


def expected(pred):
    return {"iters": pred.iters, "drafts_generated": pred.drafts_generated,
            "drafts_accepted": pred.drafts_accepted, "tokens_emitted": pred.tokens_emitted}


def wait_disconnected(*endpoints, timeout=5.0):
    """Wait until mtp_cy holds no connection to these servers (ggml closed them)."""
    deadline = time.monotonic() + timeout
    while True:
        state = {ep: mtp_cy._core._rpc_connections(ep) for ep in endpoints}
        if all(v in (None, (0, 0, 0)) for v in state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


def assert_serves(server, sm, n_tokens, **model_kw):
    """A model loaded on ``server`` alone generates the oracle's greedy text (it serves)."""
    with mtp_cy.Model(sm.path, rpc_servers=[server.endpoint], n_gpu_layers=-1, **model_kw) as m, \
            mtp_cy.Session(m, n_ctx=128, n_threads=1) as sess:
        p = prompt_of(sm, 2)
        assert sess.generate(p, max_tokens=n_tokens, temp=0) == sm.greedy(p, n_tokens).text


def n_threads_now():
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()


def n_fds_now():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


# ---------------------------------------------------------------------------------- basics

def test_rpc_backend_is_built():
    assert mtp_cy._core._rpc_available()
    assert "rpc_server" in mtp_cy.__all__ and "RPCError" in mtp_cy.__all__
    assert issubclass(mtp_cy.RPCError, mtp_cy.MTPError) and issubclass(mtp_cy.RPCError, ConnectionError)


def test_devices_lists_rpc_servers(servers):
    a, b = servers
    devs = mtp_cy.devices([a.endpoint, b.endpoint])
    assert devs[0]["backend"] != "RPC"                      # this machine's devices come first
    rpc = {d["endpoint"]: d for d in devs if d["backend"] == "RPC"}
    assert set(rpc) >= {a.endpoint, b.endpoint}
    for ep in (a.endpoint, b.endpoint):
        d = rpc[ep]
        assert d["available"] is True
        assert isinstance(d["memory_total"], int) and d["memory_total"] > 0
        assert 0 < d["memory_free"] <= d["memory_total"]
        assert d["name"].startswith("RPC") and ep in d["description"]
    # registered servers stay listed
    assert {a.endpoint, b.endpoint} <= {d.get("endpoint") for d in mtp_cy.devices()}
    # through the command line too
    r = subprocess.run([sys.executable, "-m", "mtp_cy", "info", "--rpc", f"{a.endpoint},{b.endpoint}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=child_env())
    assert r.returncode == 0, r.stderr
    assert f"RPC server {a.endpoint}" in r.stdout and f"RPC server {b.endpoint}" in r.stdout


# ---------------------------------------------------------------------------------- split model

PLACEMENTS = [
    dict(n_gpu_layers=3),                                        # CPU + both servers (upstream's default split)
    dict(n_gpu_layers=-1, split_mode="layer", tensor_split=[1.0, 2.0]),   # everything on the servers, 1:2
]


@pytest.mark.parametrize("placement", PLACEMENTS, ids=["cpu+2servers", "2servers-1to2"])
def test_split_model_equals_local_and_oracle(servers, mtp_sm, mtp_model, caplog, placement):
    a, b = servers
    caplog.set_level(logging.INFO, logger="mtp_cy")
    p = prompt_of(mtp_sm, 3)
    with mtp_cy.Model(mtp_sm.path, rpc_servers=[a.endpoint, b.endpoint], **placement) as split:
        assert split.rpc_servers == (a.endpoint, b.endpoint) and split.rpc_failed is None
        # where llama.cpp put the weights: both servers hold a part (and the CPU, when not all is offloaded)
        bufs = {}
        for rec in caplog.records:
            m = re.search(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", rec.getMessage())
            if m:
                bufs[m.group(1)] = float(m.group(2))
        for ep in (a.endpoint, b.endpoint):
            assert any(f"[{ep}]" in name and size > 0 for name, size in bufs.items()), (ep, bufs)
        cpu = sum(size for name, size in bufs.items() if name.startswith("CPU"))
        if placement["n_gpu_layers"] != -1:
            assert cpu > 0, bufs
        for n_draft in (1, 3):
            want = mtp_sm.predict(p, 40, n_draft, n_ctx=256)
            with mtp_cy.MTP(mtp_model, n_draft=n_draft, n_ctx=256, n_threads=1) as m:
                local_text = m.generate(p, max_tokens=40, temp=0)
                local_stats = counters(m.stats())
            with mtp_cy.MTP(split, n_draft=n_draft, n_ctx=256, n_threads=1) as m:
                pieces = list(m.stream(p, max_tokens=40, temp=0, timeout=30))
                st = counters(m.stats())
                events = list(m.stream_events(p, max_tokens=10, temp=0))
            assert "".join(pieces) == local_text == want.text
            assert st == local_stats == expected(want)
            assert [e[2] for e in events if e[0] == "token"] == pieces[:10]
        with mtp_cy.Session(split, n_ctx=256, n_threads=1) as s:
            assert s.generate(p, max_tokens=30, temp=0) == mtp_sm.greedy(p, 30).text
            assert s.stats()["tokens_emitted"] == 30
    assert wait_disconnected(a.endpoint, b.endpoint) == {a.endpoint: (0, 0, 0), b.endpoint: (0, 0, 0)}


def test_session_and_mtp_async_on_split_model(servers, mtp_sm):
    import asyncio
    a, b = servers
    p = prompt_of(mtp_sm, 2)

    async def run(engine):
        return "".join([x async for x in engine.astream(p, max_tokens=20, temp=0)])
    with mtp_cy.Model(mtp_sm.path, rpc_servers=[a.endpoint, b.endpoint], n_gpu_layers=2) as split:
        with mtp_cy.MTP(split, n_draft=2, n_ctx=128, n_threads=1) as m, \
                mtp_cy.Session(split, n_ctx=128, n_threads=1) as s:
            assert asyncio.run(run(m)) == asyncio.run(run(s)) == mtp_sm.greedy(p, 20).text


def test_cli_run_with_rpc(servers, mtp_sm):
    a, b = servers
    r = subprocess.run([sys.executable, "-m", "mtp_cy", "run", str(mtp_sm.path), "the sea", "--temp", "0",
                        "--max-tokens", "12", "--n-ctx", "128", "--threads", "1", "--rpc", f"{a.endpoint},{b.endpoint}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == mtp_sm.predict(mtp_sm.encode("the sea"), 12, 3, n_ctx=128).text
    r = subprocess.run([sys.executable, "-m", "mtp_cy", "run", str(mtp_sm.path), "x", "--rpc", f"{HOST}:{free_port()}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------- unreachable

def test_closed_port_is_a_clean_bounded_error():
    ep = f"{HOST}:{free_port()}"                  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(mtp_cy.ModelLoadError, match=re.escape(ep)) as ei:
        mtp_cy.Model(mtp_cy.synthetic.cached_model(mtp=True, acceptance=0.75).path, rpc_servers=[ep])
    assert time.monotonic() - t0 < 5
    assert "refused" in str(ei.value).lower()
    assert isinstance(ei.value.__cause__, mtp_cy.RPCError) and ei.value.__cause__.endpoint == ep
    with pytest.raises(mtp_cy.RPCError) as ei:
        mtp_cy.devices([ep], timeout=2)
    assert ei.value.endpoint == ep


class LoopbackListener:
    """A TCP listener on 127.0.0.1 whose connections a daemon thread hands to ``_on_connection``;
    ``close()`` stops it and closes every socket it kept in ``self.conns``."""

    def __init__(self):
        self.conns = []
        self.stopped = False
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(8)
        self.endpoint = f"{HOST}:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._on_connection(c)

    def _on_connection(self, c):
        raise NotImplementedError

    def close(self):
        self.stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(5)


class FakeServer(LoopbackListener):
    """A TCP listener on 127.0.0.1 that is not an rpc-server: ``mode`` says what it does
    with each connection ("silent": keeps it open and says nothing, "close": closes it,
    "garbage": sends a malformed reply)."""

    def __init__(self, mode):
        self.mode = mode
        super().__init__()

    def _on_connection(self, c):
        if self.mode == "close":
            c.close()
            return
        if self.mode == "garbage":
            try:
                c.recv(64)
                c.sendall((5).to_bytes(8, "little") + b"hello")
            except OSError:
                pass
        self.conns.append(c)


@pytest.fixture
def fake_server():
    made = []

    def make(mode):
        f = FakeServer(mode)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


@pytest.mark.parametrize("mode,words", [("silent", "no reply"), ("close", "closed the connection"),
                                        ("garbage", "not an rpc-server")])
def test_endpoint_that_does_not_answer_properly(fake_server, mtp_sm, mode, words):
    f = fake_server(mode)
    t0 = time.monotonic()
    with pytest.raises(mtp_cy.ModelLoadError) as ei:
        mtp_cy.Model(mtp_sm.path, rpc_servers=[f.endpoint], rpc_timeout=1.0)
    assert time.monotonic() - t0 < 6
    msg = str(ei.value)
    assert f.endpoint in msg and words in msg, msg


def test_server_busy_with_another_client(start_server, mtp_sm):
    """An rpc-server serves one client at a time: while another client holds it, loading
    reports it as busy within rpc_timeout instead of waiting forever."""
    s = start_server()
    other = socket.create_connection((HOST, s.port), timeout=5)
    try:
        # a complete HELLO: the server is now serving this client
        other.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
        size = int.from_bytes(other.recv(8), "little")
        assert size == 28 and len(other.recv(28)) == 28
        t0 = time.monotonic()
        with pytest.raises(mtp_cy.ModelLoadError, match="busy") as ei:
            mtp_cy.Model(mtp_sm.path, rpc_servers=[s.endpoint], rpc_timeout=1.0)
        assert time.monotonic() - t0 < 6 and s.endpoint in str(ei.value)
    finally:
        other.close()
    # once the other client is gone, the server is ours
    assert_serves(s, mtp_sm, 6, rpc_timeout=10)


def test_bad_rpc_arguments_raise_before_connecting(mtp_sm):
    path = mtp_sm.path
    for bad in (["nohost"], ["127.0.0.1:0"], ["127.0.0.1:70000"], ["127.0.0.1:abc"], ["[::1]:50052"],
                ["::1:50052"], [], ["127.0.0.1:5", "127.0.0.1:5"]):
        with pytest.raises(ValueError):
            mtp_cy.Model(path, rpc_servers=bad)
    for bad in ([123], 5, [None]):
        with pytest.raises(TypeError):
            mtp_cy.Model(path, rpc_servers=bad)
    with pytest.raises(ValueError):
        mtp_cy.Model(path, rpc_servers=[f"{HOST}:1"], rpc_timeout=0)
    with pytest.raises(TypeError):
        mtp_cy.Model(path, rpc_servers=[f"{HOST}:1"], rpc_timeout="1")
    with pytest.raises(mtp_cy.ModelLoadError, match="cannot resolve"):
        mtp_cy.Model(path, rpc_servers=["no-such-host.invalid:50052"])
    with pytest.raises(TypeError):
        mtp_cy.devices(rpc_servers=[1])
    with pytest.raises(ValueError):
        mtp_cy.rpc_server(HOST, 0)
    with pytest.raises(ValueError, match="unknown device"):
        mtp_cy.rpc_server(HOST, free_port(), devices=["NoSuchDevice"])


# ---------------------------------------------------------------------------------- failures

def test_server_killed_between_steps(servers, start_server, mtp_sm):
    """The server dies while the stream waits for its consumer: the next step raises RPCError
    naming it, the model refuses further work, closes cleanly, and the other servers serve
    a new model with the right output (this client released them)."""
    a, b = servers
    victim = start_server()
    p = prompt_of(mtp_sm, 3)
    model = mtp_cy.Model(mtp_sm.path, rpc_servers=[a.endpoint, victim.endpoint], n_gpu_layers=-1)
    mtp = mtp_cy.MTP(model, n_draft=3, n_ctx=512, n_threads=1)
    try:
        it = mtp.stream(p, max_tokens=200, temp=0, timeout=10)
        got = [next(it) for _ in range(12)]
        assert "".join(got) == mtp_sm.greedy(p, 12).text
        victim.stop(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(mtp_cy.RPCError) as ei:
            for piece in it:
                got.append(piece)
        assert time.monotonic() - t0 < 10
        assert ei.value.endpoint == victim.endpoint and victim.endpoint in str(ei.value)
        assert "closed the connection" in str(ei.value)
        # what was delivered before the error is right; nothing computed after the failure leaked out
        assert "".join(got) == mtp_sm.greedy(p, len(got)).text
        assert model.rpc_failed and victim.endpoint in model.rpc_failed
        with pytest.raises(mtp_cy.RPCError, match="load it again"):
            mtp.generate(p, max_tokens=5)
        with pytest.raises(mtp_cy.RPCError):
            mtp_cy.Session(model, n_ctx=128)
        # a new model on the same (dead) server while the broken one is open: clean error
        with pytest.raises(mtp_cy.ModelLoadError, match=re.escape(victim.endpoint)):
            mtp_cy.Model(mtp_sm.path, rpc_servers=[victim.endpoint], rpc_timeout=2)
    finally:
        t0 = time.monotonic()
        mtp.close()
        model.close()
        assert time.monotonic() - t0 < 5
    assert a.alive() and b.alive()
    assert wait_disconnected(a.endpoint, victim.endpoint) == {a.endpoint: (0, 0, 0), victim.endpoint: (0, 0, 0)}
    with mtp_cy.Model(mtp_sm.path, rpc_servers=[a.endpoint, b.endpoint], n_gpu_layers=-1) as again, \
            mtp_cy.MTP(again, n_draft=3, n_ctx=256, n_threads=1) as m:
        assert m.generate(p, max_tokens=30, temp=0) == mtp_sm.predict(p, 30, 3, n_ctx=256).text


CHILD = textwrap.dedent("""
    import json, sys, time
    import mtp_cy
    path, endpoints, timeout = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
    model = mtp_cy.Model(path, rpc_servers=endpoints, n_gpu_layers=-1)
    mtp = mtp_cy.MTP(model, n_draft=3, n_ctx=8192, n_threads=1)
    ids = list(model.tokenize("the sea", parse_special=True))
    print("ready", flush=True)
    n, t_err, out = 0, None, {}
    try:
        for piece in mtp.stream(ids, max_tokens=8000, temp=0, timeout=timeout):
            n += 1
            if n % 10 == 0:
                print("tokens", n, flush=True)
        out["error"] = None
    except Exception as exc:
        t_err = time.time()
        out.update(error=type(exc).__name__, message=str(exc), endpoint=getattr(exc, "endpoint", None))
    out["tokens"] = n
    out["t_error"] = t_err
    t0 = time.monotonic()
    mtp.close()
    model.close()
    out["close_s"] = time.monotonic() - t0
    print("RESULT " + json.dumps(out), flush=True)
""")


class CuttingProxy(LoopbackListener):
    """A TCP proxy on 127.0.0.1 in front of a real rpc-server that breaks a connection at a
    chosen byte: after ``cut_c2s`` bytes from the client (None = never), or -- once
    :meth:`cut_replies_after` was called -- after that many more bytes of replies."""

    def __init__(self, target_port, cut_c2s=None):
        self.target = target_port
        self.cut_c2s = cut_c2s
        self.s2c_budget = None
        self.lock = threading.Lock()
        self.cuts = 0
        self.c2s_total = 0          # bytes forwarded from clients to the server
        super().__init__()

    def cut_replies_after(self, n):
        with self.lock:
            self.s2c_budget = n

    def _on_connection(self, c):
        try:
            u = socket.create_connection((HOST, self.target))
        except OSError:             # the server is gone: so is this connection
            c.close()
            return
        self.conns += [c, u]
        threading.Thread(target=self._pump, args=(c, u, "c2s"), daemon=True).start()
        threading.Thread(target=self._pump, args=(u, c, "s2c"), daemon=True).start()

    def _cut(self, a, b):
        """Break both connections the way a dying server does (closed sockets)."""
        with self.lock:
            self.cuts += 1
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()

    def _pump(self, src, dst, direction):
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if direction == "c2s" and self.cut_c2s is not None and sent + len(data) > self.cut_c2s:
                    dst.sendall(data[:self.cut_c2s - sent])
                    self._cut(src, dst)
                    return
                if direction == "s2c":
                    with self.lock:
                        budget = self.s2c_budget
                        if budget is not None:
                            self.s2c_budget = budget - len(data)
                    if budget is not None and len(data) > budget:
                        dst.sendall(data[:max(budget, 0)])
                        self._cut(src, dst)
                        return
                dst.sendall(data)
                sent += len(data)
                if direction == "c2s":
                    with self.lock:
                        self.c2s_total += len(data)
        except OSError:
            pass
        for x in (src, dst):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass



@pytest.fixture
def cutting_proxy():
    made = []

    def make(*a, **kw):
        p = CuttingProxy(*a, **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def test_connection_lost_while_loading(servers, cutting_proxy, mtp_sm):
    """The connection breaks in the middle of sending the weights: a clean ModelLoadError, and
    the server behind it serves the next client."""
    a, _ = servers
    # what a whole load sends to this server depends on the devices here (a local GPU takes a
    # share of the layers): measure it, then break the connection half-way through
    probe = cutting_proxy(a.port)
    mtp_cy.Model(mtp_sm.path, rpc_servers=[probe.endpoint], n_gpu_layers=-1).close()
    wait_disconnected(probe.endpoint)
    assert probe.c2s_total > 0
    proxy = cutting_proxy(a.port, cut_c2s=probe.c2s_total // 2)
    t0 = time.monotonic()
    with pytest.raises(mtp_cy.ModelLoadError) as ei:
        mtp_cy.Model(mtp_sm.path, rpc_servers=[proxy.endpoint], n_gpu_layers=-1)
    assert time.monotonic() - t0 < 30
    assert proxy.cuts == 1 and proxy.endpoint in str(ei.value) and "closed the connection" in str(ei.value)
    assert wait_disconnected(proxy.endpoint)[proxy.endpoint] == (0, 0, 0)
    assert_serves(a, mtp_sm, 6)


def test_connection_lost_in_the_middle_of_a_reply(servers, cutting_proxy, mtp_sm):
    """The connection breaks while a reply (e.g. the logits) is being received."""
    a, b = servers
    proxy = cutting_proxy(b.port)
    p = prompt_of(mtp_sm, 3)
    with mtp_cy.Model(mtp_sm.path, rpc_servers=[a.endpoint, proxy.endpoint], n_gpu_layers=-1) as model, \
            mtp_cy.MTP(model, n_draft=3, n_ctx=512, n_threads=1) as mtp:
        it = mtp.stream(p, max_tokens=300, temp=0, timeout=20)
        got = [next(it) for _ in range(8)]
        proxy.cut_replies_after(50_000)
        with pytest.raises(mtp_cy.RPCError) as ei:
            for piece in it:
                got.append(piece)
        assert proxy.cuts == 1 and ei.value.endpoint == proxy.endpoint
        assert "".join(got) == mtp_sm.greedy(p, len(got)).text
    assert wait_disconnected(a.endpoint, proxy.endpoint) == {a.endpoint: (0, 0, 0), proxy.endpoint: (0, 0, 0)}


@pytest.mark.parametrize("kill_after", [10, 150])
def test_server_killed_mid_generation(servers, start_server, mtp_sm, tmp_path, kill_after):
    """The server is killed while a native step is running (upstream's client would abort the
    process): the stream raises within its timeout, the client process exits normally, and the
    other server keeps serving.  The client runs in a subprocess so that a regression (an
    abort) cannot take pytest down with it."""
    a, _ = servers
    victim = start_server()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    timeout = 20.0
    child = subprocess.Popen([sys.executable, str(script), str(mtp_sm.path), f"{a.endpoint},{victim.endpoint}",
                              str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=child_env())
    try:
        t_kill = None
        for line in child.stdout:
            if line.startswith("tokens") and int(line.split()[1]) >= kill_after and t_kill is None:
                victim.stop(signal.SIGKILL)               # the stream keeps running meanwhile
                t_kill = time.time()
            if line.startswith("RESULT"):
                result = json.loads(line[len("RESULT "):])
                break
        else:
            pytest.fail(f"no result; exit code {child.wait(30)}; stderr: {child.stderr.read()[-3000:]}")
        rc = child.wait(60)
        err = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert rc == 0, (rc, err[-3000:])                      # not -6 (SIGABRT): the interpreter did not abort
    assert "GGML_ABORT" not in err and "Remote RPC server crashed" not in err
    assert t_kill is not None and result["tokens"] >= kill_after
    assert result["error"] in ("RPCError", "GenerationTimeout"), result
    assert victim.endpoint in result["message"] and "load it again" in result["message"]
    assert result["t_error"] - t_kill < timeout
    assert result["close_s"] < 5
    assert a.alive()
    assert_serves(a, mtp_sm, 10)


def test_server_that_stops_answering_times_out(servers, start_server, mtp_sm):
    """A server that hangs (SIGSTOP) instead of dying: the stream's timeout bounds the wait."""
    a, _ = servers
    victim = start_server()
    p = prompt_of(mtp_sm, 3)
    with mtp_cy.Model(mtp_sm.path, rpc_servers=[a.endpoint, victim.endpoint], n_gpu_layers=-1) as model, \
            mtp_cy.MTP(model, n_draft=3, n_ctx=512, n_threads=1) as mtp:
        it = mtp.stream(p, max_tokens=300, temp=0, timeout=1.5)
        got = [next(it) for _ in range(5)]
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(mtp_cy.GenerationTimeout, match=re.escape(victim.endpoint)):
                for piece in it:
                    got.append(piece)
            assert time.monotonic() - t0 < 1.5 + 3
            assert "".join(got) == mtp_sm.greedy(p, len(got)).text
            with pytest.raises(mtp_cy.RPCError):
                mtp.generate(p, max_tokens=3)
        finally:
            victim.stop(signal.SIGKILL)                    # SIGKILL also ends a stopped process
    assert a.alive()
    assert wait_disconnected(a.endpoint)[a.endpoint] == (0, 0, 0)


def test_no_leaks_over_load_generate_close_cycles(servers, mtp_sm):
    a, b = servers
    p = prompt_of(mtp_sm, 2)

    def cycle():
        with mtp_cy.Model(mtp_sm.path, rpc_servers=[a.endpoint, b.endpoint], n_gpu_layers=3) as m, \
                mtp_cy.MTP(m, n_draft=2, n_ctx=128, n_threads=1) as mtp:
            assert mtp.generate(p, max_tokens=12, temp=0) == mtp_sm.greedy(p, 12).text
        wait_disconnected(a.endpoint, b.endpoint)
    cycle()
    fds, threads = n_fds_now(), n_threads_now()
    for _ in range(3):
        cycle()
    assert wait_disconnected(a.endpoint, b.endpoint) == {a.endpoint: (0, 0, 0), b.endpoint: (0, 0, 0)}
    assert n_fds_now() <= fds
    deadline = time.monotonic() + 5
    while n_threads_now() > threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert n_threads_now() <= threads


# ---------------------------------------------------------------------------------- the server command

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_rpc_server_command_stops_on_signal(start_server, sig):
    s = start_server()
    assert s.alive()
    t0 = time.monotonic()
    s.proc.send_signal(sig)
    rc = s.proc.wait(10)
    assert time.monotonic() - t0 < 10
    assert rc == 0
    out = s.output()
    assert "stopped" in out and "Starting RPC server" in out
    assert "WARNING" not in out                       # loopback: no security warning
    with pytest.raises(OSError):
        socket.create_connection((HOST, s.port), timeout=1).close()


def test_rpc_server_command_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "mtp_cy", "rpc-server", *args], capture_output=True,
                              text=True, timeout=60, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL)
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(1)
        r = run("--host", HOST, "--port", str(busy.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr
    r = run("--port", "0")
    assert r.returncode == 2 and "port" in r.stderr
    r = run("--port", str(free_port()), "--device", "NoSuchDevice")
    assert r.returncode == 2 and "unknown device" in r.stderr


def test_bind_warning_only_off_loopback():
    assert cli.rpc_bind_warning("127.0.0.1") is None
    assert cli.rpc_bind_warning("localhost") is None
    for addr in ("0.0.0.0", "192.168.1.10"):
        w = cli.rpc_bind_warning(addr)
        assert w and "no authentication" in w and addr in w


def test_rpc_server_cache_dir(start_server, tmp_path, mtp_sm):
    cache = tmp_path / "cache"
    s = start_server(args=("--cache", str(cache)))
    assert cache.is_dir()
    assert_serves(s, mtp_sm, 8)
    assert s.stop() == 0
    assert f"local cache    : {cache}" in s.output()        # upstream's own start-up report
