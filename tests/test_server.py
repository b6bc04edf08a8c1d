"""The OpenAI-compatible server (``mtp_cy.server``, ``python -m mtp_cy serve``) with real parts.

A live uvicorn server on 127.0.0.1 (in a thread, on one ``Batch``) driven by the official
``openai`` client (sync and async, streaming and not) and by raw HTTP for what a client
library hides (bad JSON, oversize bodies, disconnects); greedy text exact against a lone
``MTP`` session and the synthetic oracle; a bounded load test; the CLI in a subprocess with a
graceful SIGTERM.
"""
import asyncio
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import mtp_cy
from conftest import ROOT, counters, expected, prompt_of, rss_bytes

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from mtp_cy import server as srv  # noqa: E402

N_SEQ = 4
PER_SEQ = 256


class Live:
    """A uvicorn server for ``app`` on a free 127.0.0.1 port, in a thread."""

    def __init__(self, app):
        self.app = app
        self.state = app.state.mtp_cy
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 30 and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=60, **kw)

    def aclient(self, **kw):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                                  timeout=60, **kw)

    def raw(self, method, path, body=None, headers=None):
        """(status, headers, body bytes) of one request over a fresh connection."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            h = {"Content-Type": "application/json"}
            h.update(headers or {})
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def wait_for(cond, what, limit=20.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, f"timed out waiting for {what}"
        time.sleep(0.02)


def all_free(b):
    return all(r["state"] == "free" for r in b.stats()["slots"])


@pytest.fixture(scope="module")
def batch(mtp_model):
    with mtp_cy.Batch(mtp_model, n_seq=N_SEQ, n_draft=3, n_ctx=N_SEQ * PER_SEQ, n_threads=1) as b:
        yield b


@pytest.fixture(scope="module")
def live(batch):
    s = Live(srv.create_app(engine=batch, model_alias="synth", max_body_bytes=64 * 1024))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lone(mtp_model):
    with mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=PER_SEQ, n_threads=1) as m:
        yield m


def ref(lone, prompt, n):
    return lone.complete(prompt, max_tokens=n, temp=0)


# ---------------------------------------------------------------------------- the openai client

def test_completion_exact_against_lone_mtp_and_oracle(live, lone, mtp_sm):
    p = prompt_of(mtp_sm, 5)
    r = ref(lone, p, 40)
    c = live.client().completions.create(model="synth", prompt=p, max_tokens=40, temperature=0)
    assert c.choices[0].text == r.text
    assert c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 40 and c.usage.prompt_tokens == len(p)
    assert c.model == "synth" and c.object == "text_completion"
    assert counters(r.stats) == expected(mtp_sm.predict(p, 40, 3, n_ctx=PER_SEQ))


def test_streaming_completion_and_usage(live, lone, mtp_sm):
    p = prompt_of(mtp_sm, 4, start=3)
    r = ref(lone, p, 30)
    chunks = list(live.client().completions.create(model="synth", prompt=p, max_tokens=30, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == r.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_cached_tokens_in_usage(live, mtp_sm):
    p = prompt_of(mtp_sm, 40, start=7)
    cl = live.client()
    cl.completions.create(model="synth", prompt=p, max_tokens=4, temperature=0)
    c = cl.completions.create(model="synth", prompt=p, max_tokens=4, temperature=0)
    assert c.usage.prompt_tokens_details.cached_tokens >= len(p) - 1


def test_text_prompt_and_sampling_options(live, batch):
    cl = live.client()
    a = cl.completions.create(model="synth", prompt="the sea", max_tokens=16, temperature=0.9, seed=7, top_p=0.9)
    b = cl.completions.create(model="synth", prompt="the sea", max_tokens=16, temperature=0.9, seed=7, top_p=0.9)
    assert a.choices[0].text == b.choices[0].text           # a seeded call is reproducible
    inproc = batch.create_completion("the sea", max_tokens=16, temperature=0.9, seed=7, top_p=0.9)
    assert inproc["choices"][0]["text"] == a.choices[0].text
    lp = cl.completions.create(model="synth", prompt="the sea", max_tokens=5, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.tokens) == 5


def test_per_request_n_draft_extra_body(live, lone, mtp_sm, mtp_model):
    p = prompt_of(mtp_sm, 4, start=11)
    with mtp_cy.Session(mtp_model, n_ctx=PER_SEQ, n_threads=1) as s:
        want = s.complete(p, max_tokens=25, temp=0).text
    cl = live.client()
    for k in (0, 1, 3):
        c = cl.completions.create(model="synth", prompt=p, max_tokens=25, temperature=0, extra_body={"n_draft": k})
        assert c.choices[0].text == want, k
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(model="synth", prompt=p, max_tokens=5, extra_body={"n_draft": 99})
    assert "n_draft" in ei.value.message
    # spec_sampling: the rule for sampled drafts (a seeded "match" request is plain decoding's text)
    with mtp_cy.Session(mtp_model, n_ctx=PER_SEQ, n_threads=1) as s:
        want = s.complete(p, max_tokens=12, temp=0.9, seed=7).text
    c = cl.completions.create(model="synth", prompt=p, max_tokens=12, temperature=0.9, seed=7,
                              extra_body={"spec_sampling": "match", "n_draft": 2})
    assert c.choices[0].text == want
    c = cl.completions.create(model="synth", prompt=p, max_tokens=12, temperature=0.9, seed=7,
                              extra_body={"spec_sampling": "rejection"})
    assert c.usage.completion_tokens == 12
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(model="synth", prompt=p, max_tokens=5, extra_body={"spec_sampling": "exact"})
    assert "spec_sampling" in ei.value.message


def test_chat_completion_streaming_and_not(live, batch):
    msgs = [{"role": "user", "content": "hello there"}]
    cl = live.client()
    tmpl = live.state.default_template
    want = batch.create_chat_completion(msgs, max_tokens=20, temperature=0, template=tmpl)
    c = cl.chat.completions.create(model="synth", messages=msgs, max_tokens=20, temperature=0)
    assert c.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert c.choices[0].message.role == "assistant"
    parts = list(cl.chat.completions.create(model="synth", messages=msgs, max_tokens=20, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == c.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == c.choices[0].finish_reason


def test_chatml_default_for_a_model_without_template(mtp_model):
    assert mtp_model.chat_template is None       # the synthetic model has none: the server uses ChatML
    app = srv.create_app(engine=mtp_cy.Batch(mtp_model, n_seq=1, n_ctx=PER_SEQ, n_threads=1))
    try:
        assert app.state.mtp_cy.default_template == srv.CHATML_TEMPLATE
        text = mtp_model.apply_chat_template([{"role": "user", "content": "hi"}], template=srv.CHATML_TEMPLATE)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    finally:
        app.state.mtp_cy.engine.close()


def test_async_client_concurrent_exact(live, lone, mtp_sm):
    prompts = [prompt_of(mtp_sm, 3 + i % 4, start=20 + i) for i in range(10)]
    lens = [15 + 3 * i for i in range(10)]
    want = [ref(lone, p, n).text for p, n in zip(prompts, lens)]

    async def main():
        cl = live.aclient()

        async def one(i):
            if i % 2:
                s = await cl.completions.create(model="synth", prompt=prompts[i], max_tokens=lens[i], temperature=0,
                                                stream=True)
                return "".join([ch.choices[0].text async for ch in s if ch.choices])
            c = await cl.completions.create(model="synth", prompt=prompts[i], max_tokens=lens[i], temperature=0)
            return c.choices[0].text
        try:
            return await asyncio.gather(*(one(i) for i in range(10)))
        finally:
            await cl.close()
    assert asyncio.run(main()) == want
    wait_for(lambda: all_free(live.state.engine), "free slots")


def test_models_health_metrics(live):
    cl = live.client()
    ms = cl.models.list()
    assert [m.id for m in ms.data] == ["synth"]
    assert cl.models.retrieve("synth").id == "synth"
    with pytest.raises(openai.NotFoundError):
        cl.models.retrieve("nope")
    st, _, body = live.raw("GET", "/health")
    assert st == 200 and json.loads(body) == {"status": "ok"}
    n_stream = live.state.ttft.n
    list(cl.completions.create(model="synth", prompt="x", max_tokens=3, temperature=0, stream=True))
    st, h, body = live.raw("GET", "/metrics")
    assert st == 200 and h["content-type"].startswith("text/plain")
    text = body.decode()
    es = live.state.engine.stats()
    vals = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            vals[k] = float(v)
    assert vals["mtp_cy_drafts_accepted_total"] == es["drafts_accepted"]
    assert vals["mtp_cy_drafts_generated_total"] == es["drafts_generated"]
    assert vals['mtp_cy_drafts_generated_by_position_total{position="1"}'] == es["drafts_generated_by_pos"][0]
    assert sum(es["drafts_generated_by_pos"]) == es["drafts_generated"]
    assert sum(es["drafts_accepted_by_pos"]) == es["drafts_accepted"]
    assert vals["mtp_cy_time_to_first_token_seconds_count"] == n_stream + 1
    assert vals['mtp_cy_requests_total{endpoint="completions",status="200"}'] >= 1
    assert vals["mtp_cy_requests_in_flight"] == 0
    assert vals["mtp_cy_completion_tokens_total"] > 0


# ---------------------------------------------------------------------------- errors

def test_errors_have_openai_shape(live):
    cl = live.client()
    with pytest.raises(openai.NotFoundError) as ei:
        cl.completions.create(model="other", prompt="x", max_tokens=2)
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(model="synth", prompt="x", max_tokens=2, extra_body={"bogus": 1})
    assert "bogus" in ei.value.message
    with pytest.raises(openai.BadRequestError):
        cl.completions.create(model="synth", prompt="x", max_tokens=2, temperature="hot")
    with pytest.raises(openai.BadRequestError):
        cl.chat.completions.create(model="synth", messages=[{"role": "user"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError):      # longer than the per-sequence context
        cl.completions.create(model="synth", prompt=[5] * (PER_SEQ + 10), max_tokens=2)
    st, _, body = live.raw("POST", "/v1/completions", b"{not json")
    assert st == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    st, _, body = live.raw("POST", "/v1/completions", b"[1, 2]")
    assert st == 400
    st, _, body = live.raw("POST", "/v1/completions", {"prompt": "x" * (70 * 1024)})
    assert st == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    st, _, body = live.raw("POST", "/v1/completions", {"max_tokens": 3})
    assert st == 400 and json.loads(body)["error"]["param"] == "prompt"
    st, _, body = live.raw("GET", "/v1/nowhere")
    assert st == 404 and "error" in json.loads(body)
    st, _, body = live.raw("GET", "/v1/completions")
    assert st == 405
    # the server still works
    assert cl.completions.create(model="synth", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None
    assert all_free(live.state.engine)


def test_api_key(batch):
    s = Live(srv.create_app(engine=batch, api_key="sekrit"))
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model=s.state.model_id, prompt="x", max_tokens=2)
        st, h, _ = s.raw("GET", "/v1/models")
        assert st == 401 and h.get("www-authenticate") == "Bearer"
        st, _, _ = s.raw("GET", "/metrics")
        assert st == 401
        assert s.raw("GET", "/health")[0] == 200                   # health needs no key
        c = s.client(api_key="sekrit").completions.create(model=s.state.model_id, prompt="x", max_tokens=2)
        assert c.usage.completion_tokens == 2
    finally:
        s.stop()


def test_api_key_from_environment(batch, monkeypatch):
    monkeypatch.setenv("MTP_CY_API_KEY", "from-env")
    assert srv.create_app(engine=batch).state.mtp_cy.api_key == "from-env"
    monkeypatch.delenv("MTP_CY_API_KEY")
    assert srv.create_app(engine=batch).state.mtp_cy.api_key is None


def test_bad_server_options(batch):
    for kw, exc in ((dict(max_queue=-1), ValueError), (dict(timeout=0), ValueError),
                    (dict(max_body_bytes=10), ValueError), (dict(), TypeError)):
        with pytest.raises(exc):
            if kw:
                srv.create_app(engine=batch, **kw)
            else:
                srv.create_app()
    with pytest.raises(TypeError):
        srv.create_app(engine=object())
    assert srv.bind_warning("127.0.0.1", None) is None
    assert srv.bind_warning("0.0.0.0", "key") is None
    assert "API key" in srv.bind_warning("0.0.0.0", None)


# ---------------------------------------------------------------------------- queue, timeout, disconnects

@pytest.fixture()
def one_slot(mtp_model):
    """A one-slot server with no queue, and the in-process stream that holds its slot."""
    with mtp_cy.Batch(mtp_model, n_seq=1, n_draft=3, n_ctx=PER_SEQ, n_threads=1) as b:
        s = Live(srv.create_app(engine=b, max_queue=0))
        try:
            yield s, b
        finally:
            s.stop()


def hold_slot(b):
    it = b.stream([5, 6, 7], max_tokens=100, temp=0)
    next(it)                       # the slot is taken and stays so until the stream is closed
    return it


def test_slot_wait_timeout_and_full_queue(one_slot):
    s, b = one_slot
    it = hold_slot(b)
    try:
        st, h, body = s.raw("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "timeout": 0.5})
        assert st == 503 and json.loads(body)["error"]["code"] == "queue_timeout" and h.get("retry-after")
        out = {}
        t = threading.Thread(target=lambda: out.update(r=s.raw("POST", "/v1/completions",
                                                                {"prompt": "x", "max_tokens": 2, "timeout": 30})))
        t.start()
        wait_for(lambda: b.stats()["batch"]["waiting"] == 1, "a waiting request")
        st, _, body = s.raw("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert st == 503 and json.loads(body)["error"]["code"] == "queue_full"
        assert s.state.rejected == 1
    finally:
        it.close()
    t.join(30)
    assert out["r"][0] == 200
    wait_for(lambda: all_free(b) and s.state.in_flight == 0, "free slots")


def test_disconnect_while_waiting_cancels(one_slot):
    s, b = one_slot
    it = hold_slot(b)
    try:
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 50, "stream": True}),
                  headers={"Content-Type": "application/json"})
        wait_for(lambda: b.stats()["batch"]["waiting"] == 1, "a waiting request")
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
        wait_for(lambda: s.state.in_flight == 0 and b.stats()["batch"]["waiting"] == 0, "the request to go")
        assert s.state.disconnects == 1
    finally:
        it.close()
    assert b.complete("x", max_tokens=3, temp=0).usage.completion_tokens == 3


def test_disconnect_mid_stream_frees_the_slot(one_slot):
    s, b = one_slot
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    c.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 200, "stream": True,
                                                          "temperature": 0}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    wait_for(lambda: s.state.in_flight == 0 and all_free(b), "the slot to be freed")
    assert s.raw("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_load_many_clients_random_disconnects(live, lone, mtp_sm):
    """64 requests from 16 concurrent clients, mixed streaming, ~1 in 5 dropped mid-way: every
    finished response complete and exact, nothing lost or duplicated, no 5xx, slots free, RSS flat."""
    prompts = [prompt_of(mtp_sm, 3 + i % 5, start=40 + i) for i in range(8)]
    lens = [10 + 5 * (i % 6) for i in range(8)]
    want = [ref(lone, p, n).text for p, n in zip(prompts, lens)]

    def one(i, rng):
        j = i % 8
        body = {"model": "synth", "prompt": prompts[j], "max_tokens": lens[j], "temperature": 0}
        mode = rng.choice(["plain", "stream", "stream", "drop"])
        if mode == "plain":
            st, _, data = live.raw("POST", "/v1/completions", body)
            assert st == 200, data
            d = json.loads(data)
            return ("done", i, d["choices"][0]["text"], d["usage"]["completion_tokens"])
        c = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
        try:
            c.request("POST", "/v1/completions", body=json.dumps(dict(body, stream=True)),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            assert r.status == 200
            text, seen_done = "", False
            while True:
                line = r.readline()
                if not line:
                    break
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    seen_done = True
                    break
                ch = json.loads(line[6:])
                assert "error" not in ch, ch
                text += ch["choices"][0]["text"]
                if mode == "drop":
                    c.sock.shutdown(socket.SHUT_RDWR)
                    return ("dropped", i, None, None)
            assert seen_done
            return ("done", i, text, None)
        finally:
            c.close()

    def round_():
        results, errs = [], []
        lock = threading.Lock()
        counter = iter(range(64))

        def client(seed):
            rng = random.Random(seed)
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    r = one(i, rng)
                except BaseException as exc:       # noqa: BLE001 - reported below
                    errs.append(exc)
                    return
                with lock:
                    results.append(r)
        ts = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(300)
        assert not errs, errs
        assert sorted(r[1] for r in results) == list(range(64))          # nothing lost or duplicated
        for kind, i, text, ntok in results:
            if kind == "done":
                assert text == want[i % 8], i
                if ntok is not None:
                    assert ntok == lens[i % 8]
        wait_for(lambda: live.state.in_flight == 0 and all_free(live.state.engine), "free slots")
        codes = {k[1] for k in live.state.requests}
        assert not any(c >= 500 for c in codes), live.state.requests
    round_()
    rss0 = rss_bytes()
    round_()
    round_()
    assert rss_bytes() - rss0 < 24 << 20


# ---------------------------------------------------------------------------- the command line

class ServeProcess:
    """``python -m mtp_cy serve`` in a subprocess on a free port (its output in a log file)."""

    def __init__(self, sm, tmp_path, *args, host="127.0.0.1"):
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("MTP_CY_API_KEY", None)
        self.log_path = tmp_path / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.p = subprocess.Popen([sys.executable, "-m", "mtp_cy", "serve", sm.path, "--host", host,
                                   "--port", str(self.port), "--threads", "1", "--log-level", "warning", *args],
                                  stdout=self.log, stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert self.p.poll() is None, self.output()
            assert time.monotonic() - t0 < 90, "the server did not start"
            time.sleep(0.1)

    def output(self):
        return self.log_path.read_text()

    def stream(self, body):
        """A streaming request: the open response, its first event already read."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("POST", "/v1/completions", body=json.dumps(dict(body, stream=True)),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        while not r.readline().startswith(b"data: "):
            pass
        return c, r

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.log.close()


def read_events(r):
    """The rest of an SSE response: (text chunks, whether it ended with data: [DONE])."""
    n = 0
    try:
        while True:
            line = r.readline()
            if not line:
                return n, False
            if line.strip() == b"data: [DONE]":
                return n, True
            if line.startswith(b"data: "):
                assert b'"error"' not in line, line
                n += 1
    except (http.client.IncompleteRead, ConnectionError):
        return n, False


def test_cli_serve_sigterm_lets_requests_finish(mtp_sm, tmp_path):
    # one long request (thousands of tokens) is in flight when SIGTERM arrives: it finishes
    # (the deadline is long), /health says so meanwhile, new connections are refused, exit 0
    sp = ServeProcess(mtp_sm, tmp_path, "--n-seq", "1", "--n-ctx", "2048", "--n-draft", "2", "--model-alias", "tiny",
                      "--shutdown-timeout", "60", host="0.0.0.0")
    try:
        assert "WARNING" in sp.output() and "API key" in sp.output()    # bound beyond loopback, no key
        cl = openai.OpenAI(base_url=f"http://127.0.0.1:{sp.port}/v1", api_key="x", max_retries=0, timeout=60)
        assert cl.models.list().data[0].id == "tiny"
        c, r = sp.stream({"model": "tiny", "prompt": "the sea", "max_tokens": 1500, "temperature": 0})
        sp.p.send_signal(signal.SIGTERM)
        n, done = read_events(r)
        c.close()
        assert done and n > 100
        assert sp.p.wait(60) == 0, sp.output()
    finally:
        sp.close()


def test_cli_serve_shutdown_deadline_cancels(mtp_sm, tmp_path):
    sp = ServeProcess(mtp_sm, tmp_path, "--n-seq", "1", "--n-ctx", "4096", "--shutdown-timeout", "0.5")
    try:
        c, r = sp.stream({"prompt": "the sea", "max_tokens": 4000, "temperature": 0})
        t0 = time.monotonic()
        sp.p.send_signal(signal.SIGTERM)
        n, done = read_events(r)
        c.close()
        assert not done                                   # cut at the deadline
        assert sp.p.wait(30) == 0, sp.output()
        assert time.monotonic() - t0 < 15
    finally:
        sp.close()


def test_cli_serve_warns_beyond_loopback_and_bad_args(mtp_sm, capsys):
    from mtp_cy.__main__ import build_parser
    a = build_parser().parse_args(["serve", "m.gguf", "--cache-ram", "512M", "--n-draft", "0", "--host", "0.0.0.0"])
    assert a.cache_ram == 512 << 20 and a.n_draft == 0 and a.host == "0.0.0.0" and a.n_seq == 4
    for bad in (["--n-draft", "x"], ["--cache-ram", "lots"], ["--n-seq", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "m.gguf"] + bad)
