"""asyncio front-end of the native streams (``astream``, ``astream_events``, ``agenerate``, ``achat``).

Every native step runs in a worker thread (``concurrent.futures`` pool, the
GIL released inside llama.cpp) and the event loop awaits its future, so the
loop never blocks and nothing busy-waits.  Each ``__anext__`` runs at most one
native step (a prefill, one decode, or one MTP draft/verify iteration) and
then hands over every item that step produced: generation advances only while
the consumer asks for more, exactly like the synchronous iterator, so the
statistics of an abandoned stream are the same as in the sync API.

Cancellation: when the task awaiting ``__anext__`` is cancelled, the stream's
native loop is told to stop (llama.cpp's abort callback, checked between
graph nodes), the cancellation waits -- without blocking the loop, and
ignoring further cancel requests -- until the worker has returned, closes the
stream (which releases the session) and then propagates ``CancelledError``.
So once the cancellation has completed, the native loop has stopped and the
session accepts a new stream.  ``aclose()`` and ``async with`` give the same
guarantee; an abandoned iterator (``break`` out of ``async for``) is released
as soon as it is garbage (no step runs between two ``__anext__`` calls).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import threading
from typing import Any, Callable, Generic, Optional, TypeVar

__all__ = ["AsyncStream", "collect", "collect_events"]

T = TypeVar("T")

_executor = None
_executor_lock = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads of the async streams (created on first use).

    A stream occupies one worker only while one of its native steps runs, and a
    session runs one stream at a time, so this bounds the number of sessions
    that can compute at the same time, not the number of open streams."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(32, 4 * (os.cpu_count() or 1)), thread_name_prefix="mtp_cy-async")
        return _executor


def _submit_open(fn) -> "concurrent.futures.Future[Any]":
    """Run ``fn`` (a stream's first step: it opens the stream) in a thread of its own.

    Opening may wait: an :class:`mtp_cy.Batch` call waits for a free slot.  Waiting in the
    shared pool would let calls that wait occupy every worker while the calls holding the
    slots need a worker for their next step (they would never free their slots): the
    opening step never takes a pool worker."""
    fut: "concurrent.futures.Future[Any]" = concurrent.futures.Future()

    def run():
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:      # noqa: BLE001 - handed to the awaiting task
            fut.set_exception(exc)
    threading.Thread(target=run, name="mtp_cy-async-open", daemon=True).start()
    return fut


class _Once:
    """A callable for the pool that drops its target before the result is handed over.

    The pool's worker thread keeps its work item (and so the submitted callable)
    referenced until it gets the GIL back after setting the result; holding the
    stream through it would keep the session busy for a moment after the
    consumer let go of the iterator."""
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        fn, self.fn = self.fn, None
        return fn()


class AsyncStream(Generic[T]):
    """Async iterator over one generation call of a :class:`Session` or :class:`MTP`.

    Returned by ``astream``, ``astream_events``, ``achat`` and ``achat_events``.
    The synchronous stream is opened in the worker thread on the first
    ``__anext__`` (prompt tokenization and the chat template included), so
    errors in the arguments and :class:`SessionBusyError` are raised by the
    first iteration, as with any async generator.  Use ``async for``;
    ``aclose()`` or ``async with`` stop it early.
    """

    __slots__ = ("_opener", "_stream", "_items", "_future", "_done", "_cancel_requested", "__weakref__")

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener: Optional[Callable[[], Any]] = opener
        self._stream: Any = None
        self._items: "collections.deque[Any]" = collections.deque()
        self._future: "Optional[concurrent.futures.Future[Any]]" = None
        self._done = False
        self._cancel_requested = False

    def __repr__(self):
        state = "finished" if self._done else ("running" if self._future is not None else "idle")
        return f"<mtp_cy.AsyncStream {state}>"

    # -- worker side ------------------------------------------------------------------
    def _step(self):
        """Runs in a worker thread: open the stream if needed, then run one native step."""
        s = self._stream
        if s is None:
            opener, self._opener = self._opener, None
            s = opener()
            self._stream = s
            # pairs with _request_cancel (both sides run under the GIL): either this
            # sees the request or the requester sees the stream
            if self._cancel_requested:
                s._cancel()
        return s._pull()

    def _step_all(self):
        """Runs in a worker thread: the whole stream at once (for :func:`collect`)."""
        out = []
        while True:
            items = self._step()
            if not items:
                return out
            out.extend(items)

    def _request_cancel(self):
        self._cancel_requested = True
        s = self._stream
        if s is not None:
            s._cancel()

    async def _stop(self, cf):
        """Stop the step in flight and wait (not blocking the loop) until the worker has returned."""
        self._request_cancel()
        cf.cancel()                      # a step that has not started yet never will
        while not cf.done():
            try:
                await asyncio.wrap_future(cf)
            except asyncio.CancelledError:
                continue                 # cancelled again: keep waiting, the guarantee needs it
            except BaseException:
                break
        self._finish()

    def _finish(self):
        self._future = None
        self._done = True
        self._items.clear()
        if self._stream is not None:
            self._stream.close()

    # -- async iterator -----------------------------------------------------------------
    def __aiter__(self) -> "AsyncStream[T]":
        return self

    async def __anext__(self) -> T:
        if self._items:
            return self._items.popleft()
        if self._done:
            raise StopAsyncIteration
        if self._future is not None:
            raise RuntimeError("another task is already waiting for the next item of this stream")
        step = _Once(self._step)
        cf = _submit_open(step) if self._stream is None else _pool().submit(step)
        self._future = cf
        try:
            items = await asyncio.wrap_future(cf)
        except asyncio.CancelledError:
            await self._stop(cf)
            raise
        except BaseException:
            self._future = None
            if self._stream is None:     # opening failed: there is nothing to resume
                self._done = True
            raise
        if self._future is not cf:       # aclose() from another task meanwhile
            raise StopAsyncIteration
        self._future = None
        if not items:
            self._finish()
            raise StopAsyncIteration
        self._items.extend(items)
        return self._items.popleft()

    async def aclose(self) -> None:
        """Stop the stream; when this returns the native loop has stopped and the session is free."""
        cf = self._future
        if cf is not None and not cf.done():
            await self._stop(cf)
        else:
            self._finish()

    async def __aenter__(self) -> "AsyncStream[T]":
        return self

    async def __aexit__(self, *exc: object) -> bool:
        await self.aclose()
        return False

    def __del__(self):
        # a step still in flight keeps the native stream alive; make it stop soon
        try:
            if self._future is not None and not self._future.done():
                self._request_cancel()
        except Exception:
            pass

    # -- results ------------------------------------------------------------------------
    @property
    def finish_reason(self) -> Optional[str]:
        """``None`` until the stream ended, then as :attr:`finish_reason` of the sync stream."""
        return None if self._stream is None else self._stream.finish_reason

    @property
    def stop_reason(self) -> Optional[str]:
        """``None`` until the stream ended, then as :attr:`stop_reason` of the sync stream."""
        return None if self._stream is None else self._stream.stop_reason

    @property
    def stop_string(self) -> Optional[str]:
        """The stop string that ended the stream, or ``None``."""
        return None if self._stream is None else self._stream.stop_string

    @property
    def chat_parser(self):
        """The chat parser of a chat stream once it is open (see the sync stream), else ``None``."""
        return None if self._stream is None else self._stream.chat_parser

    @property
    def completion(self):
        """This call's :class:`mtp_cy.Completion` once the stream has ended, else ``None``."""
        return None if self._stream is None else self._stream.completion


async def _run_all(stream: "AsyncStream[Any]") -> list:
    """Every item of an :class:`AsyncStream`, the whole generation in one worker job (no hop
    through the event loop per token: nobody consumes the items one by one), with the same
    cancellation guarantee as ``__anext__``: when the cancelled await has returned, the native
    loop has stopped and the session is free."""
    if stream._done or stream._future is not None or stream._items:
        items = []
        try:
            async for x in stream:
                items.append(x)
        finally:
            await stream.aclose()
        return items
    cf = _pool().submit(_Once(stream._step_all))
    stream._future = cf
    try:
        items = await asyncio.wrap_future(cf)
    except asyncio.CancelledError:
        await stream._stop(cf)
        raise
    except BaseException:
        stream._future = None
        stream._finish()
        raise
    stream._future = None
    stream._finish()
    return items


async def collect(stream: "AsyncStream[str]") -> str:
    """Join the pieces of an :class:`AsyncStream` (``agenerate``); see :func:`_run_all`."""
    return "".join(await _run_all(stream))


async def collect_events(stream: "AsyncStream[Any]") -> Any:
    """Run an event stream to its end (see :func:`_run_all`); its :class:`mtp_cy.Completion`."""
    await _run_all(stream)
    return stream.completion
