"""An OpenAI-compatible HTTP server on :class:`mtp_cy.Batch`: ``python -m mtp_cy serve MODEL.gguf``.

Needs the ``server`` extra (``pip install "mtp_cy[server]"``): `Starlette
<https://www.starlette.io>`_ (the ASGI toolkit under FastAPI, small and well kept)
and `uvicorn <https://www.uvicorn.org>`_ (the ASGI server).  The core package does
not import either.

Every request is one call of one :class:`mtp_cy.Batch`: up to ``n_seq`` requests
generate together in one batched MTP loop (continuous batching: requests join and
leave between steps), the others wait for a free slot in arrival order.  The
request and response shapes are those of :mod:`mtp_cy.openai_compat` (OpenAI's);
the server adds what a server needs:

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (non-streaming, or
  streaming as server-sent events ending with ``data: [DONE]``; the extra body field
  ``n_draft`` sets this request's draft length), ``GET /v1/models``,
  ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus text).
* Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
  400 for a bad body or parameter, 401 for a wrong or missing key (when a key is
  set), 404 for an unknown model or route, 413 for a body over the limit, 503 when
  the queue is full, the request waited ``timeout`` seconds for a slot, or the
  server is shutting down, 504 when a started generation ran out of time.
  An error after a stream has started is sent as a last ``data: {"error": ...}``
  event.
* A client that disconnects cancels its request (waiting or generating; its slot
  is freed within one step).  A bounded queue: at most ``n_seq + max_queue``
  requests are admitted at once.  A request body size limit.  A per-request
  ``timeout`` (the body's ``timeout`` field may lower it, not raise it).
* Graceful shutdown (SIGTERM / SIGINT): no new connections, requests in flight may
  finish within ``shutdown_timeout`` seconds and are cancelled after that, then the
  engine is closed and the process exits with status 0.
* A model whose GGUF has no chat template is served with ChatML (as llama-server
  does), so ``/v1/chat/completions`` works with any model.

Use it from Python::

    from mtp_cy.server import create_app, serve
    serve("model.gguf", n_seq=4, port=8000)             # blocks; Ctrl-C stops it
    app = create_app("model.gguf", n_seq=4)             # an ASGI app for your own server
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["create_app", "serve", "ServerState", "CHATML_TEMPLATE", "bind_warning"]

logger = logging.getLogger("mtp_cy.server")

#: the chat template used for a model whose GGUF has none (ChatML, llama-server's fallback too)
CHATML_TEMPLATE = ("{%- for message in messages -%}"
                   "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
                   "{%- endfor -%}"
                   "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _need_server_extra():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:      # pragma: no cover - depends on the installation
        raise ImportError(f"the mtp_cy server needs the 'server' extra: pip install \"mtp_cy[server]\" "
                          f"(missing: {exc.name})") from None


class _HTTPError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_of(exc: BaseException) -> _HTTPError:
    """The HTTP error for an exception raised by a generation call."""
    import mtp_cy
    if isinstance(exc, _HTTPError):
        return exc
    if isinstance(exc, mtp_cy.QueueTimeout):
        return _HTTPError(503, str(exc), "server_busy", code="queue_timeout", headers={"Retry-After": "1"})
    if isinstance(exc, mtp_cy.GenerationTimeout):
        return _HTTPError(504, str(exc), "timeout", code="generation_timeout")
    if isinstance(exc, mtp_cy.ClosedError):
        return _HTTPError(503, "the server is shutting down", "server_busy", code="shutting_down")
    if isinstance(exc, (TypeError, ValueError, mtp_cy.MTPUnsupportedError)):
        return _HTTPError(400, str(exc), "invalid_request_error", param=_param_of(str(exc)))
    logger.exception("request failed", exc_info=exc)
    return _HTTPError(500, f"{type(exc).__name__}: {exc}", "server_error")


def _param_of(msg: str) -> Optional[str]:
    """The parameter an argument error names first (``name must ...`` / ``name=...``), when it does."""
    head = msg.split(" ", 1)[0].split("=", 1)[0].strip("'\"(),:")
    return head if head.isidentifier() and head not in ("a", "the", "unsupported") else None


# ----------------------------------------------------------------------------- metrics

class _Histogram:
    __slots__ = ("buckets", "counts", "sum", "n")

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, help_: str) -> List[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            out.append(f'{name}_bucket{{le="{b:g}"}} {c}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
        return out


class ServerState:
    """What the server counts (all on the event loop's thread) and the engine it serves."""

    def __init__(self, engine, *, model_id: str, owns: Sequence[Any] = (), api_key: Optional[str] = None,
                 max_queue: int = 64, max_body_bytes: int = 8 << 20, timeout: float = 600.0,
                 default_template: Optional[str] = None):
        self.engine = engine
        self.model_id = model_id
        self.owns = list(owns)
        self.api_key = api_key or None
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout
        self.default_template = default_template
        self.created = int(time.time())
        self.draining = False
        self.in_flight = 0
        self.requests: Dict[Tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.disconnects = 0
        self.rejected = 0
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.duration = _Histogram(_DURATION_BUCKETS)

    @property
    def capacity(self) -> int:
        """Requests admitted at once: one per slot plus the queue."""
        return self.engine.n_seq + self.max_queue

    def count(self, endpoint: str, status: int) -> None:
        """Count one answered request (499: the client went away first)."""
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def add_usage(self, usage: Optional[Dict[str, Any]]) -> None:
        """Add a finished request's OpenAI ``usage`` to the token counters."""
        if not usage:
            return
        self.prompt_tokens += int(usage.get("prompt_tokens", 0))
        self.completion_tokens += int(usage.get("completion_tokens", 0))
        det = usage.get("prompt_tokens_details") or {}
        self.cached_tokens += int(det.get("cached_tokens", 0) or 0)

    def metrics(self) -> str:
        """The Prometheus text exposition of the counters and of the engine's live statistics."""
        st = self.engine.stats()
        b = st.get("batch", {})
        lines: List[str] = []

        def metric(name, kind, help_, value, labels=""):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

        lines += ["# HELP mtp_cy_requests_total HTTP requests answered, by endpoint and status code",
                  "# TYPE mtp_cy_requests_total counter"]
        for (ep, code), n in sorted(self.requests.items()):
            lines.append(f'mtp_cy_requests_total{{endpoint="{ep}",status="{code}"}} {n}')
        metric("mtp_cy_requests_in_flight", "gauge", "generation requests admitted and not yet answered",
               self.in_flight)
        metric("mtp_cy_requests_rejected_total", "counter", "requests refused because the queue was full",
               self.rejected)
        metric("mtp_cy_client_disconnects_total", "counter", "requests cancelled because the client went away",
               self.disconnects)
        metric("mtp_cy_prompt_tokens_total", "counter", "prompt tokens of finished requests", self.prompt_tokens)
        metric("mtp_cy_prompt_tokens_cached_total", "counter",
               "prompt tokens whose state the prompt cache already held", self.cached_tokens)
        metric("mtp_cy_completion_tokens_total", "counter", "tokens generated for finished requests",
               self.completion_tokens)
        metric("mtp_cy_tokens_emitted_total", "counter", "tokens generated by the engine (live)",
               st["tokens_emitted"])
        metric("mtp_cy_verify_steps_total", "counter", "per-sequence verification passes (iters)", st["iters"])
        metric("mtp_cy_drafts_generated_total", "counter", "tokens drafted by the MTP head", st["drafts_generated"])
        metric("mtp_cy_drafts_accepted_total", "counter", "drafted tokens the target model accepted",
               st["drafts_accepted"])
        gen_pos = st.get("drafts_generated_by_pos") or []
        acc_pos = st.get("drafts_accepted_by_pos") or []
        lines += ["# HELP mtp_cy_drafts_generated_by_position_total tokens drafted at each draft position (1 = first)",
                  "# TYPE mtp_cy_drafts_generated_by_position_total counter"]
        lines += [f'mtp_cy_drafts_generated_by_position_total{{position="{i + 1}"}} {n}' for i, n in enumerate(gen_pos)]
        lines += ["# HELP mtp_cy_drafts_accepted_by_position_total drafted tokens accepted at each draft position",
                  "# TYPE mtp_cy_drafts_accepted_by_position_total counter"]
        lines += [f'mtp_cy_drafts_accepted_by_position_total{{position="{i + 1}"}} {n}' for i, n in enumerate(acc_pos)]
        metric("mtp_cy_batch_size", "gauge", "sequences in the last batched step", b.get("size", 0))
        metric("mtp_cy_batch_steps_total", "counter", "batched steps run", b.get("steps", 0))
        metric("mtp_cy_batch_mean_size", "gauge", "mean sequences per batched step", f"{b.get('mean_size', 0.0):.4f}")
        metric("mtp_cy_queue_length", "gauge", "requests waiting for a free slot", b.get("waiting", 0))
        metric("mtp_cy_slots", "gauge", "sequence slots of the engine", st.get("n_seq", 0))
        busy = sum(1 for r in st.get("slots", ()) if r.get("state") != "free")
        metric("mtp_cy_slots_busy", "gauge", "slots holding a request", busy)
        pol = st.get("policy")
        if pol:
            metric("mtp_cy_draft_length", "gauge", "the draft length n_draft='auto' chose last", pol["k"])
        lines += self.ttft.lines("mtp_cy_time_to_first_token_seconds",
                                 "from the request's arrival to its first token (streaming requests)")
        lines += self.duration.lines("mtp_cy_request_duration_seconds",
                                     "from the request's arrival to its last byte (generation requests)")
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- app

def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def _send_json(send, status: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
    body = _json_bytes(obj)
    hs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Generation:
    """The ASGI response of one generation request: runs it, watches for the client leaving."""

    def __init__(self, state: ServerState, endpoint: str, body: Dict[str, Any], t0: float):
        self.state = state
        self.endpoint = endpoint
        self.body = body
        self.t0 = t0
        self.status = 200

    async def __call__(self, scope, receive, send) -> None:
        st = self.state
        work = asyncio.ensure_future(self._run(send))
        watch = asyncio.ensure_future(self._watch(receive))
        try:
            try:
                await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                # cancelled from outside (the shutdown deadline): stop the call, wait until it has stopped
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                self.status = 503
                raise
            if not work.done():              # the client went away: stop its call
                st.disconnects += 1
                self.status = 499
                work.cancel()
            try:
                await work
            except asyncio.CancelledError:
                if not watch.done():
                    raise
            except OSError:
                st.disconnects += 1          # the connection broke while sending
                self.status = 499
        finally:
            watch.cancel()
            st.in_flight -= 1
            st.count(self.endpoint, self.status)
            st.duration.observe(time.perf_counter() - self.t0)

    @staticmethod
    async def _watch(receive) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return

    async def _run(self, send) -> None:
        from mtp_cy import openai_compat as oc
        st = self.state
        body = dict(self.body)
        stream = body.pop("stream", False)
        stream = False if stream is None else stream
        try:
            if self.endpoint == "chat":
                messages = body.pop("messages", None)
                if messages is None:
                    raise _HTTPError(400, "'messages' is required", param="messages")
                if st.default_template is not None and body.get("template") is None:
                    body["template"] = st.default_template
                out = await oc.acreate_chat_completion(st.engine, messages, stream=stream, **body)
            else:
                if "prompt" not in body:
                    raise _HTTPError(400, "'prompt' is required", param="prompt")
                prompt = body.pop("prompt")
                out = await oc.acreate_completion(st.engine, prompt, stream=stream, **body)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:             # noqa: BLE001 - answered as an HTTP error
            err = _error_of(exc)
            self.status = err.status
            await _send_json(send, err.status, err.body(), err.headers)
            return
        if not stream:
            st.add_usage(out.get("usage"))
            await _send_json(send, 200, out)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        first = True
        usage = None
        try:
            async for chunk in out:
                if first and chunk.get("choices") and self._has_token(chunk):
                    st.ttft.observe(time.perf_counter() - self.t0)
                    first = False
                if chunk.get("usage"):
                    usage = chunk["usage"]
                await send({"type": "http.response.body", "body": b"data: " + _json_bytes(chunk) + b"\n\n",
                            "more_body": True})
        except asyncio.CancelledError:
            raise
        except OSError:
            raise
        except BaseException as exc:             # noqa: BLE001 - sent as the stream's last event
            err = _error_of(exc)
            self.status = err.status
            await send({"type": "http.response.body", "body": b"data: " + _json_bytes(err.body()) + b"\n\n",
                        "more_body": False})
            return
        finally:
            await out.aclose()
        if usage is None:
            c = getattr(out, "completion", None)
            usage = c.usage.as_dict() if c is not None else None
        st.add_usage(usage)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    @staticmethod
    def _has_token(chunk) -> bool:
        ch = chunk["choices"][0]
        if "text" in ch:
            return bool(ch["text"]) or ch.get("finish_reason") is not None
        d = ch.get("delta") or {}
        return bool(d.get("content") or d.get("reasoning_content") or d.get("tool_calls")) or \
            ch.get("finish_reason") is not None


def _build_app(state: ServerState, on_shutdown=None):
    _need_server_extra()
    from contextlib import asynccontextmanager
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    def error(err: _HTTPError) -> Response:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise _HTTPError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                             "invalid_request_error", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> Dict[str, Any]:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > state.max_body_bytes:
            raise _HTTPError(413, f"the request body is larger than {state.max_body_bytes} bytes",
                             code="request_too_large")
        chunks, n = [], 0
        async for part in request.stream():
            n += len(part)
            if n > state.max_body_bytes:
                raise _HTTPError(413, f"the request body is larger than {state.max_body_bytes} bytes",
                                 code="request_too_large")
            chunks.append(part)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HTTPError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _HTTPError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def generation(endpoint: str):
        async def handler(request: Request):
            t0 = time.perf_counter()
            try:
                check_key(request)
                if state.draining:
                    raise _HTTPError(503, "the server is shutting down", "server_busy", code="shutting_down")
                body = await read_json(request)
                model = body.pop("model", None)
                if model is not None and model != state.model_id:
                    raise _HTTPError(404, f"the model {model!r} does not exist (this server serves "
                                          f"{state.model_id!r})", code="model_not_found", param="model")
                body["model"] = state.model_id
                t = body.get("timeout")
                if t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and t > state.timeout):
                    body["timeout"] = state.timeout
                if state.in_flight >= state.capacity:
                    state.rejected += 1
                    raise _HTTPError(503, f"the server is busy: {state.engine.n_seq} requests are generating and "
                                          f"{state.max_queue} are waiting; retry later", "server_busy",
                                     code="queue_full", headers={"Retry-After": "1"})
            except _HTTPError as err:
                state.count(endpoint, err.status)
                return error(err)
            except ClientDisconnect:
                state.count(endpoint, 499)
                return Response(status_code=499)
            state.in_flight += 1
            return _Generation(state, endpoint, body, t0)
        return handler

    async def models(request: Request):
        try:
            check_key(request)
        except _HTTPError as err:
            return error(err)
        return JSONResponse({"object": "list", "data": [model_card()]})

    def model_card():
        eng = state.engine
        m = eng.model
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "mtp_cy",
                "meta": {"path": m.path, "n_params": m.n_params, "n_ctx_per_seq": eng.n_ctx, "n_seq": eng.n_seq,
                         "n_draft": eng.n_draft, "has_mtp": m.has_mtp}}

    async def model_one(request: Request):
        try:
            check_key(request)
            if request.path_params["model"] != state.model_id:
                raise _HTTPError(404, f"the model {request.path_params['model']!r} does not exist",
                                 code="model_not_found", param="model")
        except _HTTPError as err:
            return error(err)
        return JSONResponse(model_card())

    async def health(request: Request):
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request):
        try:
            check_key(request)
        except _HTTPError as err:
            return error(err)
        return PlainTextResponse(state.metrics(), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc):
        return error(_HTTPError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def bad_method(request: Request, exc):
        return error(_HTTPError(405, f"method {request.method} is not allowed on {request.url.path}",
                                code="method_not_allowed"))

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            state.draining = True
            if on_shutdown is not None:
                on_shutdown()
            for o in state.owns:
                o.close()

    routes = [Route("/v1/completions", generation("completions"), methods=["POST"]),
              Route("/v1/chat/completions", generation("chat"), methods=["POST"]),
              Route("/completions", generation("completions"), methods=["POST"]),
              Route("/chat/completions", generation("chat"), methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", model_one, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: bad_method})
    app.state.mtp_cy = state
    return app


def create_app(model: Union[str, "os.PathLike[str]", Any, None] = None, *, engine=None, mtp_head: Optional[str] = None,
               n_seq: int = 4, n_draft: Union[str, int] = "auto", n_ctx: Optional[int] = None,
               cache_ram: Optional[int] = None, api_key: Optional[str] = None, model_alias: Optional[str] = None,
               max_queue: int = 64, max_body_bytes: int = 8 << 20, timeout: float = 600.0,
               n_gpu_layers: Optional[int] = None, **context_options):
    """The ASGI application (Starlette) of the server.

    ``model`` is a GGUF path or an open :class:`mtp_cy.Model`; the app then opens a
    :class:`mtp_cy.Batch` on it (``n_seq``, ``n_draft``, ``n_ctx``, ``cache_ram``,
    ``**context_options`` as for ``Batch``) and closes what it opened when the app
    shuts down.  Or pass ``engine=`` an open ``Batch`` (the caller keeps owning it).

    ``api_key`` (default: the ``MTP_CY_API_KEY`` environment variable) makes every
    route but ``/health`` ask for ``Authorization: Bearer <key>``; ``model_alias``
    is the model id of ``/v1/models`` and of the results (default: the file's stem);
    ``max_queue`` requests may wait beyond the ``n_seq`` that generate;
    ``max_body_bytes`` bounds a request body; ``timeout`` (seconds) bounds one request,
    its wait for a slot included."""
    import mtp_cy
    owns: List[Any] = []
    if engine is None:
        if model is None:
            raise TypeError("create_app() needs a model (a GGUF path or a mtp_cy.Model) or engine=")
        if isinstance(model, mtp_cy.Model):
            m = model
        else:
            kw: Dict[str, Any] = {}
            if mtp_head is not None:
                kw["mtp_head"] = mtp_head
            if n_gpu_layers is not None:
                kw["n_gpu_layers"] = n_gpu_layers
            m = mtp_cy.Model(os.fspath(model), **kw)
            owns.append(m)
        try:
            bkw: Dict[str, Any] = dict(context_options)
            if n_ctx is not None:
                bkw["n_ctx"] = n_ctx
            if cache_ram is not None:
                bkw["cache_ram"] = cache_ram
            engine = mtp_cy.Batch(m, n_seq=n_seq, n_draft=n_draft, **bkw)
        except BaseException:
            for o in owns:
                o.close()
            raise
        owns.insert(0, engine)
    elif not isinstance(engine, mtp_cy.Batch):
        raise TypeError(f"engine must be a mtp_cy.Batch, got {type(engine).__name__}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise ValueError(f"max_body_bytes must be an int >= 1024, got {max_body_bytes!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or math.isnan(timeout):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if api_key is None:
        api_key = os.environ.get("MTP_CY_API_KEY") or None
    mid = model_alias or os.path.splitext(os.path.basename(engine.model.path))[0]
    template = None if engine.model.chat_template else CHATML_TEMPLATE
    state = ServerState(engine, model_id=mid, owns=owns, api_key=api_key, max_queue=max_queue,
                        max_body_bytes=max_body_bytes, timeout=float(timeout), default_template=template)
    try:
        return _build_app(state)
    except BaseException:
        for o in owns:
            o.close()
        raise


def bind_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """The warning printed when the server listens beyond loopback without an API key (else ``None``)."""
    if api_key:
        return None
    try:
        ips = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return None
    if ips and all(ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback for ip in ips):
        return None
    return (f"WARNING: the server listens on {host}, which is not a loopback address, and no API key is set: "
            f"anyone who can reach this port can use the model. Set --api-key (or MTP_CY_API_KEY), or bind "
            f"to 127.0.0.1.")


def serve(model: Union[str, "os.PathLike[str]", Any, None] = None, *, host: str = "127.0.0.1", port: int = 8000,
          shutdown_timeout: float = 10.0, log_level: str = "info", ready: Optional[threading.Event] = None,
          **app_options) -> int:
    """Run the server until SIGTERM / SIGINT (blocks); returns 0 after a graceful shutdown.

    ``app_options`` are those of :func:`create_app`.  On a signal the server stops
    accepting connections, lets the requests in flight finish for up to
    ``shutdown_timeout`` seconds, cancels the rest, closes the engine and returns.
    ``ready`` (a ``threading.Event``) is set once the socket listens."""
    _need_server_extra()
    import uvicorn
    app = create_app(model, **app_options)
    state: ServerState = app.state.mtp_cy
    warn = bind_warning(host, state.api_key)
    if warn:
        logger.warning("%s", warn)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="on", access_log=log_level == "debug")
    server = uvicorn.Server(config)

    orig_startup = server.startup

    async def startup(sockets=None):
        await orig_startup(sockets=sockets)
        if ready is not None and server.started:
            ready.set()
    server.startup = startup              # type: ignore[method-assign]

    def handle_exit(sig, frame):
        # uvicorn's own handler records the signal and raises it again once the server has
        # stopped (the process would then die of SIGTERM): a graceful stop here ends with status 0
        state.draining = True             # /health says so and new requests get 503
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True      # a second Ctrl-C: do not wait for the requests in flight
        else:
            server.should_exit = True
    server.handle_exit = handle_exit      # type: ignore[method-assign]
    logger.info("mtp_cy server: model %s (%s), n_seq %d, n_draft %s, on http://%s:%d", state.model_id,
                state.engine.model.path, state.engine.n_seq, state.engine.n_draft, host, port)
    try:
        server.run()
    finally:
        for o in state.owns:              # also when startup failed (the lifespan never ran)
            o.close()
    return 0 if server.started else 1
