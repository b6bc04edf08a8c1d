# The machinery shared by Session and MTP: context options, the abort callback,
# statistics snapshots and the token stream (a plain Python iterator whose
# __next__ runs one native step with the GIL released).

_KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16,
             "q8_0": GGML_TYPE_Q8_0, "q4_0": GGML_TYPE_Q4_0, "q4_1": GGML_TYPE_Q4_1,
             "iq4_nl": GGML_TYPE_IQ4_NL, "q5_0": GGML_TYPE_Q5_0, "q5_1": GGML_TYPE_Q5_1}
_FLOAT_KV_TYPES = ("f32", "f16", "bf16")
_FLASH_ATTN = {"auto": LLAMA_FLASH_ATTN_TYPE_AUTO, True: LLAMA_FLASH_ATTN_TYPE_ENABLED,
               False: LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": LLAMA_FLASH_ATTN_TYPE_ENABLED,
               "off": LLAMA_FLASH_ATTN_TYPE_DISABLED}

CONTEXT_OPTIONS = ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "flash_attn",
                   "type_k", "type_v", "offload_kqv")
STREAM_OPTIONS = ("max_tokens", "timeout", "stop") + tuple(SAMPLER_DEFAULTS)

# a stream's finish reasons
DEF R_NONE = 0
DEF R_MAX = 1
DEF R_EOG = 2
DEF R_CTX = 3
DEF R_CANCEL = 4
DEF R_ERROR = 5
DEF R_STOP = 6


def _default_threads():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


cdef llama_context_params _context_params(dict o) except *:
    """Validate the context options (already defaulted) into llama_context_params."""
    cdef llama_context_params cp = llama_context_default_params()
    n_ctx = _as_int("n_ctx", o["n_ctx"])
    if n_ctx <= 0:
        raise ValueError(f"n_ctx must be > 0, got {n_ctx}")
    n_batch = o["n_batch"]
    n_batch = min(n_ctx, 2048) if n_batch is None else _as_int("n_batch", n_batch, 1)
    n_ubatch = o["n_ubatch"]
    n_ubatch = min(n_batch, 512) if n_ubatch is None else _as_int("n_ubatch", n_ubatch, 1, n_batch)
    nt = o["n_threads"]
    nt = _default_threads() if nt is None else _as_int("n_threads", nt, 1, 1024)
    ntb = o["n_threads_batch"]
    ntb = nt if ntb is None else _as_int("n_threads_batch", ntb, 1, 1024)
    fa = o["flash_attn"]
    if fa not in _FLASH_ATTN or (isinstance(fa, int) and not isinstance(fa, bool)):
        raise ValueError(f"flash_attn must be 'auto', True/'on' or False/'off', got {fa!r}")
    for name in ("type_k", "type_v"):
        if o[name] not in _KV_TYPES:
            raise ValueError(f"{name} must be one of {', '.join(_KV_TYPES)}, got {o[name]!r}")
    # llama.cpp refuses this at context creation ("quantized V cache requires flash_attn")
    if o["type_v"] not in _FLOAT_KV_TYPES and _FLASH_ATTN[fa] == LLAMA_FLASH_ATTN_TYPE_DISABLED:
        raise ValueError(f"type_v={o['type_v']!r} (a quantized V cache) needs flash attention: "
                         f"use flash_attn='auto' or True, not {fa!r}")
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = n_ubatch
    cp.n_seq_max = 1
    cp.n_threads = nt
    cp.n_threads_batch = ntb
    cp.flash_attn_type = _FLASH_ATTN[fa]
    cp.type_k = _KV_TYPES[o["type_k"]]
    cp.type_v = _KV_TYPES[o["type_v"]]
    cp.offload_kqv = bool(o["offload_kqv"])
    cp.no_perf = True
    return cp


cdef dict _with_defaults(dict given, dict defaults, str where):
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s): {', '.join(sorted(unknown))}; "
                        f"allowed: {', '.join(defaults)}")
    d = dict(defaults)
    d.update(given)
    return d


CONTEXT_DEFAULTS = {"n_ctx": 2048, "n_batch": None, "n_ubatch": None, "n_threads": None,
                    "n_threads_batch": None, "flash_attn": "auto", "type_k": "f16", "type_v": "f16",
                    "offload_kqv": True}


cdef cbool _abort_cb(void * data) noexcept nogil:
    """Called by ggml between graph nodes: cancel, timeout and Ctrl-C handling."""
    cdef mtp_cy_abort * a = <mtp_cy_abort *> data
    cdef int64_t now
    if a.cancel.load() or a.interrupted or a.timed_out:
        return True     # sticky: every later graph (draft or target) aborts too
    if a.deadline_us == 0 and not a.check_signals:
        return False
    now = ggml_time_us()
    if a.deadline_us != 0 and now > a.deadline_us:
        a.timed_out = 1
        return True
    if a.check_signals and now >= a.next_signal_check_us:
        a.next_signal_check_us = now + 20000
        if _pending_signal():
            a.interrupted = 1
            return True
    return False


cdef bint _pending_signal() noexcept with gil:
    try:
        PyErr_CheckSignals()
    except BaseException as exc:
        _interrupt_holder.append(exc)
        return True
    return False

_interrupt_holder = []


cdef class _Engine:
    """Base of Session and MTP: the target context, statistics and the busy flag."""
    cdef readonly Model model
    cdef llama_context * ctx
    cdef common_batch * batch
    cdef mtp_cy_stats * st
    cdef mtp_cy_abort * ab
    cdef mtp_cy_flag * busy
    cdef bint _closed
    cdef int _running          # a native step is running (another thread may be waiting in close())
    cdef readonly int n_ctx
    cdef int n_batch
    cdef int64_t _decode_start_us
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self.ctx = NULL
        self.batch = NULL
        self.st = new mtp_cy_stats()
        self.ab = new mtp_cy_abort()
        self.busy = new mtp_cy_flag()
        self._closed = True

    cdef void _free_native(self) noexcept:
        if self.batch != NULL:
            del self.batch
            self.batch = NULL
        if self.ctx != NULL:
            llama_free(self.ctx)
            self.ctx = NULL

    def __dealloc__(self):
        self._free_native()
        if self.model is not None and not self._closed:
            self.model._release()
        del self.st
        del self.ab
        del self.busy

    cdef _wait_idle(self):
        import time
        self.ab.cancel.store(1)
        while self._running:
            time.sleep(0.001)

    def close(self):
        """Free the contexts (idempotent).  A running stream is cancelled first."""
        if self._closed:
            return
        self._wait_idle()
        self._closed = True
        self._free_native()
        self.model._release()

    @property
    def closed(self):
        """``True`` once :meth:`close` was called."""
        return self._closed

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    cdef inline void _check(self) except *:
        if self._closed:
            raise ClosedError(f"this {type(self).__name__} is closed")

    def cancel(self):
        """Stop the running stream; safe from any thread (e.g. a UI or a watchdog).

        The native loop stops at the next ggml graph node (or before its next
        step); the stream then ends without an error: :meth:`stream` simply
        stops, :meth:`stream_events` ends with ``("done", stats)`` whose
        ``stats["stop_reason"]`` is ``"cancelled"``.  Tokens already produced
        are kept.  A ``cancel()`` made while no stream runs does not affect
        the next call.
        """
        self.ab.cancel.store(1)

    # -- statistics -----------------------------------------------------------------
    cdef dict _stats(self):
        cdef int64_t gen = mtp_cy_get(self.st.drafts_generated)
        cdef int64_t acc = mtp_cy_get(self.st.drafts_accepted)
        cdef int64_t emitted = mtp_cy_get(self.st.tokens_emitted)
        cdef int64_t total = mtp_cy_get(self.st.t_total_us)
        return {
            "iters": mtp_cy_get(self.st.iters),
            "drafts_generated": gen,
            "drafts_accepted": acc,
            "acceptance_rate": (<double>acc / <double>gen) if gen > 0 else 0.0,
            "tokens_emitted": emitted,
            "tokens_per_sec": (<double>emitted * 1e6 / <double>total) if total > 0 else 0.0,
            "timing_us": {
                "draft": mtp_cy_get(self.st.t_draft_us),
                "verify": mtp_cy_get(self.st.t_verify_us),
                "sample": mtp_cy_get(self.st.t_sample_us),
                "total": total,
                "prefill": mtp_cy_get(self.st.t_prefill_us),
            },
            "prompt_tokens": mtp_cy_get(self.st.prompt_tokens),
            "calls": mtp_cy_get(self.st.calls),
        }

    def reset_stats(self):
        """Set every cumulative counter back to zero."""
        mtp_cy_reset(self.st.iters); mtp_cy_reset(self.st.drafts_generated)
        mtp_cy_reset(self.st.drafts_accepted); mtp_cy_reset(self.st.tokens_emitted)
        mtp_cy_reset(self.st.prompt_tokens); mtp_cy_reset(self.st.calls)
        mtp_cy_reset(self.st.t_draft_us); mtp_cy_reset(self.st.t_verify_us)
        mtp_cy_reset(self.st.t_sample_us); mtp_cy_reset(self.st.t_total_us)
        mtp_cy_reset(self.st.t_prefill_us)

    # -- hooks implemented by Session / MTP -----------------------------------------
    cdef int _start(self, _Stream s) except -1:
        raise NotImplementedError

    cdef int _step(self, _Stream s) except -1:
        raise NotImplementedError

    cdef void _finish(self, _Stream s) noexcept:
        pass

    cdef dict _final_stats(self):
        return self._stats()

    # -- chat and asyncio (shared by Session and MTP) ---------------------------------
    cdef str _chat_prompt(self, messages, template, chat_template_kwargs):
        self._check()
        if chat_template_kwargs is None:
            kw = {}
        elif isinstance(chat_template_kwargs, _Mapping):
            kw = dict(chat_template_kwargs)
        else:
            raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        return self.model._apply_chat(messages, True, template, kw)

    def chat(self, messages, *, template=None, chat_template_kwargs=None, **options):
        """Generate the assistant's reply to a conversation; an iterator of ``str`` pieces.

        ``messages`` is a list of ``{"role": ..., "content": ...}`` dicts; they are
        rendered with :meth:`Model.apply_chat_template` (the GGUF's Jinja chat
        template, or ``template=``; ``chat_template_kwargs`` is a dict of extra
        template variables such as ``{"enable_thinking": False}`` or
        ``{"tools": [...]}``) with the generation prompt appended, and the text
        is tokenized with special tokens parsed (``<|im_start|>`` becomes one
        token).  Generation then works exactly as :meth:`stream` with the same
        ``**options`` (``max_tokens``, ``stop``, sampler options, ...); it ends at
        the model's end-of-turn token.  A malformed conversation raises
        ``ValueError`` naming the message index.
        """
        return self.stream(self._chat_prompt(messages, template, chat_template_kwargs), **options)

    def chat_events(self, messages, *, template=None, chat_template_kwargs=None, emit_stats_every=0, **options):
        """Like :meth:`chat` but yields the event tuples of :meth:`stream_events`."""
        return self.stream_events(self._chat_prompt(messages, template, chat_template_kwargs),
                                  emit_stats_every=emit_stats_every, **options)

    def astream(self, prompt, **options):
        """Async version of :meth:`stream`: ``async for piece in session.astream(prompt, ...)``.

        Returns an async iterator (:class:`mtp_cy._aio.AsyncStream`).  Every
        native step runs in a worker thread (GIL released), so the event loop
        keeps running; each ``__anext__`` runs at most one native step, so
        generation advances only as fast as the consumer reads.  The stream is
        opened by the first ``__anext__`` (errors in the arguments and
        :class:`SessionBusyError` are raised there).

        Cancelling the task that awaits the next piece stops the native loop: when
        the cancellation has completed, the loop has stopped and the session is
        free again (same guarantee as :meth:`cancel` + closing a sync stream).
        ``break`` releases the session as soon as the iterator is garbage;
        ``await it.aclose()`` or ``async with session.astream(...) as it:`` do it
        deterministically.  Same options as :meth:`stream`.
        """
        from mtp_cy._aio import AsyncStream
        self._check()
        return AsyncStream(lambda: self.stream(prompt, **options))

    def astream_events(self, prompt, emit_stats_every=0, **options):
        """Async version of :meth:`stream_events` (see :meth:`astream`)."""
        from mtp_cy._aio import AsyncStream
        self._check()
        return AsyncStream(lambda: self.stream_events(prompt, emit_stats_every=emit_stats_every, **options))

    def agenerate(self, prompt, **options):
        """Async version of :meth:`generate`: ``text = await session.agenerate(prompt, ...)``.

        A coroutine; cancelling it stops the native loop as described in :meth:`astream`.
        """
        from mtp_cy._aio import collect
        return collect(self.astream(prompt, **options))

    def achat(self, messages, *, template=None, chat_template_kwargs=None, **options):
        """Async version of :meth:`chat`: ``async for piece in session.achat(messages, ...)``.

        The chat template is rendered in the worker thread too (see :meth:`astream`).
        """
        from mtp_cy._aio import AsyncStream
        self._check()
        return AsyncStream(lambda: self.chat(messages, template=template,
                                             chat_template_kwargs=chat_template_kwargs, **options))

    def achat_events(self, messages, *, template=None, chat_template_kwargs=None, emit_stats_every=0, **options):
        """Async version of :meth:`chat_events` (see :meth:`astream`)."""
        from mtp_cy._aio import AsyncStream
        self._check()
        return AsyncStream(lambda: self.chat_events(messages, template=template,
                                                    chat_template_kwargs=chat_template_kwargs,
                                                    emit_stats_every=emit_stats_every, **options))

    # -- streams ----------------------------------------------------------------------
    cdef _Stream _open(self, prompt, dict kw, bint events, str where, int emit_stats_every):
        self._check()
        o = _with_defaults(kw, STREAM_DEFAULTS, where)
        max_tokens = _as_int("max_tokens", o["max_tokens"])
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        timeout = o["timeout"]
        if timeout is not None:
            timeout = _as_float("timeout", timeout, 0.0, None, True)
        stops = _stop_strings(o["stop"])
        cdef _Stream s = _Stream.__new__(_Stream)
        s.prompt = self.model._prompt_tokens(prompt)
        if <int>s.prompt.size() >= self.n_ctx:
            raise ValueError(f"prompt is {s.prompt.size()} tokens but n_ctx is {self.n_ctx}; "
                             f"it must be shorter than n_ctx (raise n_ctx or shorten the prompt)")
        _fill_sampling(&s.sp, self.model._vocab, o)
        s.smpl = _make_sampler(self.model._model, &s.sp)
        if not self.busy.try_acquire():
            common_sampler_free(s.smpl)
            s.smpl = NULL
            raise SessionBusyError(f"this {type(self).__name__} is busy: another stream on it is still open "
                                   "(exhaust or close() it first, or use a second session)")
        s.engine = self
        s.owns_busy = True
        self.ab.cancel.store(0)     # a cancel() before this call does not affect it
        s.events = events
        s.max_tokens = max_tokens
        s.timeout_us = 0 if timeout is None else <int64_t>(timeout * 1e6)
        s.emit_stats_every = emit_stats_every
        s.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        s.vocab = self.model._vocab
        s.queue = []
        s.stops = stops
        if stops is not None:
            s.max_stop = max(len(x) for x in stops)
        return s

    cdef int _arm(self, _Stream s) except -1:
        """Prepare the abort state before a native step."""
        self.ab.timed_out = 0
        self.ab.interrupted = 0
        self.ab.deadline_us = (ggml_time_us() + s.timeout_us) if s.timeout_us > 0 else 0
        self.ab.check_signals = threading.current_thread() is threading.main_thread()
        self.ab.next_signal_check_us = 0
        return 0

    cdef bint _aborted(self):
        return self.ab.cancel.load() != 0 or self.ab.timed_out != 0 or self.ab.interrupted != 0

    cdef int _raise_interrupt(self) except -1:
        """Raise a Ctrl-C that the abort callback took during a step that finished anyway.

        The callback runs only where a graph has CPU nodes; on a GPU the graph that would
        have stopped on the sticky flag may have none left, so a step can complete after the
        callback consumed the signal.  The KeyboardInterrupt must not be lost then."""
        if self.ab.interrupted and _interrupt_holder:
            exc = _interrupt_holder.pop()
            del _interrupt_holder[:]
            raise exc
        return 0

    cdef int _raise_rc(self, int rc, str what) except -1:
        """Map a llama_process return code to an exception."""
        if rc == 2 or self.ab.cancel.load() or self.ab.timed_out or self.ab.interrupted:
            self._raise_interrupt()
            if self.ab.timed_out:
                raise GenerationTimeout(f"no token within the timeout while {what}")
            return R_CANCEL
        raise DecodeError(f"llama.cpp failed while {what} (code {rc}): {_take_errors() or 'no detail'}")


STREAM_DEFAULTS = dict(SAMPLER_DEFAULTS, max_tokens=256, timeout=60.0, stop=None)


cdef tuple _stop_strings(stop):
    """Validate ``stop=`` (None, a str or a list of str) into a tuple (None when there is none)."""
    if stop is None:
        return None
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, (list, tuple, set, frozenset)):
        stops = list(stop)
    else:
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    for i, x in enumerate(stops):
        if not isinstance(x, str):
            raise TypeError(f"stop strings must be str, got {type(x).__name__} at index {i}")
        if not x:
            raise ValueError("stop strings must not be empty (an empty string would match before any text)")
    if not stops:
        return None
    return tuple(dict.fromkeys(stops))



cdef class _Stream:
    """Iterator over the output of one generation call (see Session.stream / MTP.stream).

    Stop strings (``stop=``): the generated text is scanned after every token.
    Text that might still turn out to be the beginning of a stop string is held
    back and released as soon as it cannot be one; when a stop string appears,
    the text before it is delivered, the stop string and everything after it
    are dropped, and generation ends (terminal event ``("stop", string)``).

    Token accounting with stop strings (``stats()["tokens_emitted"]`` and the
    ``("token", ...)`` events): a token is *delivered* (counted, and its event
    yielded) once all of its text has been released.  When a stop string is
    found, every held token whose text begins before the stop string is
    delivered too -- its piece cut at the stop string (a *partially delivered*
    token counts as one delivered token) -- and the tokens whose text lies
    entirely inside or after the stop string are neither delivered nor counted.
    Tokens generated but never delivered (the rest of an MTP verification
    batch after the stop) are not counted either; ``iters``/``drafts_*`` count
    the native work actually done.  A token whose bytes only start a UTF-8
    character belongs to that character.  When the stream ends for another
    reason (``max_tokens``, end of generation, full context, ``cancel()``), the
    held text is released first.  ``max_tokens`` bounds the tokens generated.
    """
    cdef _Engine engine
    cdef vector[llama_token] prompt
    cdef common_params_sampling sp
    cdef common_sampler * smpl
    cdef const llama_vocab * vocab
    cdef vector[llama_token] pending
    cdef size_t pending_pos
    cdef bint events
    cdef bint started
    cdef bint finished
    cdef bint owns_busy
    cdef int reason
    cdef int max_tokens
    cdef int emitted              # tokens generated (and taken off `pending`), EOG excluded
    cdef int delivered            # tokens delivered to the caller (see the class docstring)
    cdef int emit_stats_every
    cdef int64_t timeout_us
    cdef object decoder
    cdef list queue
    cdef object deferred          # an error raised after the held-back text was flushed
    # stop strings (stops is None without them)
    cdef tuple stops
    cdef Py_ssize_t max_stop
    cdef str text                 # generated text from character `base` on
    cdef Py_ssize_t base
    cdef Py_ssize_t released      # characters released to the caller
    cdef Py_ssize_t total         # characters decoded so far
    cdef list held                # (token, start, end, piece_end) of the undelivered tokens
    cdef str hit                  # the stop string that ended the stream
    # native loop state (used by the engines)
    cdef int n_past
    cdef llama_token last
    cdef int out_idx
    cdef bint need_decode
    cdef vector[llama_token] history
    cdef vector[llama_token] draft

    def __cinit__(self):
        self.smpl = NULL
        self.pending_pos = 0
        self.started = False
        self.finished = False
        self.owns_busy = False
        self.reason = R_NONE
        self.emitted = 0
        self.delivered = 0
        self.stops = None
        self.text = ""
        self.base = 0
        self.released = 0
        self.total = 0
        self.held = []
        self.hit = None
        self.deferred = None

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        if self.smpl != NULL:
            common_sampler_free(self.smpl)
            self.smpl = NULL
        if self.owns_busy and self.engine is not None:
            self.engine._finish(self)
            self.engine.busy.release()
            self.owns_busy = False

    cdef void _end(self, int reason):
        self.finished = True
        self.reason = reason
        self._release()

    def __iter__(self):
        return self

    def close(self):
        """Stop the stream; when it returns the native loop has stopped and the session is free."""
        if not self.finished:
            self._end(R_CANCEL)
        self.queue = []
        self.deferred = None

    def _cancel(self):
        """Ask the native loop of *this* stream to stop (no effect once it has finished).

        Unlike the session's ``cancel()``, this cannot hit a later stream of the
        same session: the check and the flag are one step under the GIL, and the
        stream releases the session only while holding the GIL.
        """
        if self.owns_busy and not self.finished:
            self.engine.ab.cancel.store(1)

    @property
    def finish_reason(self):
        """``None`` while running, then ``"max_tokens"``, ``"eog"``, ``"stop"``, ``"ctx_full"``,
        ``"cancelled"`` or ``"error"``."""
        return (None, "max_tokens", "eog", "ctx_full", "cancelled", "error", "stop")[self.reason]

    @property
    def stop_string(self):
        """The stop string that ended the stream, or ``None``."""
        return self.hit

    @property
    def tokens_delivered(self):
        """Tokens delivered so far by this stream (see the class docstring)."""
        return self.delivered

    # -- delivery ---------------------------------------------------------------------
    cdef void _deliver(self, llama_token tok, piece, bint with_text) except *:
        self.delivered += 1
        mtp_cy_add(self.engine.st.tokens_emitted, 1)
        if self.events:
            self.queue.append(("token", tok, piece))
            if self.emit_stats_every > 0 and self.delivered % self.emit_stats_every == 0:
                self.queue.append(("stats", self.engine._stats()))
        elif with_text and piece:
            self.queue.append(piece)

    cdef void _release_to(self, Py_ssize_t upto) except *:
        """Release the text up to character ``upto`` and deliver the tokens it completes."""
        cdef Py_ssize_t nb
        cdef tuple h
        if not self.events and upto > self.released:
            self.queue.append(self.text[self.released - self.base:upto - self.base])
        if upto > self.released:
            self.released = upto
        while self.held:
            h = <tuple>self.held[0]
            if <Py_ssize_t>h[2] > self.released:
                break
            del self.held[0]
            self._deliver(h[0], self.text[<Py_ssize_t>h[1] - self.base:<Py_ssize_t>h[3] - self.base]
                          if self.events else None, False)
        nb = self.released
        if self.held:
            nb = min(nb, <Py_ssize_t>(<tuple>self.held[0])[1])
        if nb > self.base:
            self.text = self.text[nb - self.base:]
            self.base = nb

    cdef bint _scan(self) except -1:
        """Look for a stop string in the undelivered text; release what cannot start one."""
        cdef Py_ssize_t rel = self.released - self.base
        cdef Py_ssize_t best = -1, i, k, p, n = len(self.text)
        cdef str hit = None
        cdef tuple h
        for x in self.stops:
            i = self.text.find(x, rel)
            if i >= 0 and (best < 0 or i < best or (i == best and len(x) < len(hit))):
                best = i
                hit = x
        if best >= 0:
            p = self.base + best
            if not self.events and best > rel:
                self.queue.append(self.text[rel:best])
            self.released = p
            for h in self.held:
                if <Py_ssize_t>h[1] < p:     # its text starts before the stop string
                    self._deliver(h[0], self.text[<Py_ssize_t>h[1] - self.base:
                                                  min(<Py_ssize_t>h[3], p) - self.base]
                                  if self.events else None, False)
            self.held = []
            self.hit = hit
            self._finish_event(R_STOP)
            return True
        # hold back the longest tail that is still the beginning of a stop string
        # (candidates start with the stop string's first character; the first
        # one found is the longest for that string)
        k = 0
        w = max(rel, n - (self.max_stop - 1))
        for x in self.stops:
            c = (<str>x)[0]
            i = self.text.find(c, w)
            while 0 <= i and n - i > k:
                if n - i < len(x) and (<str>x).startswith(self.text[i:]):
                    k = n - i
                    break
                i = self.text.find(c, i + 1)
        self._release_to(self.total - k)
        return False

    cdef void _flush(self) except *:
        """Release everything held back (the stream ends for another reason than a stop string)."""
        cdef tuple h
        if self.stops is None:
            return
        self._release_to(self.total)
        for h in self.held:    # tokens ending in an incomplete character (its bytes are dropped)
            self._deliver(h[0], self.text[<Py_ssize_t>h[1] - self.base:<Py_ssize_t>h[3] - self.base]
                          if self.events else None, False)
        self.held = []

    cdef int _take(self, llama_token tok) except -1:
        """Process one generated token: end of generation, text, stop strings, max_tokens."""
        cdef Py_ssize_t start
        if llama_vocab_is_eog(self.vocab, tok):
            self._finish_event(R_EOG)
            return 0
        b = self.engine.model._piece(tok)
        self.emitted += 1
        if self.stops is None:
            self._deliver(tok, self.decoder.decode(b), True)
        else:
            start = self.total
            piece = self.decoder.decode(b)
            self.total += len(piece)
            self.text += piece
            # a token whose bytes start a character belongs to that character
            self.held.append((tok, start, self.total + (1 if self.decoder.getstate()[0] else 0), self.total))
            if self._scan():
                return 0
        if self.emitted >= self.max_tokens:
            self._finish_event(R_MAX)
        return 0

    cdef _finish_event(self, int reason):
        eng = self.engine
        if reason != R_STOP:
            self._flush()
        self._end(reason)
        if self.events:
            if reason == R_EOG:
                self.queue.append(("eog", None))
            elif reason == R_STOP:
                self.queue.append(("stop", self.hit))
            elif reason in (R_MAX, R_CTX, R_CANCEL):
                fs = eng._final_stats()
                fs["stop_reason"] = {R_MAX: "max_tokens", R_CTX: "ctx_full", R_CANCEL: "cancelled"}[reason]
                self.queue.append(("done", fs))
        # bytes of a character left incomplete when generation stopped are dropped (in
        # both modes), never yielded as a broken half or a replacement character

    cdef int _native_step(self) except -1:
        """Run one native step (prefill + first step, or one decode / draft-verify iteration)."""
        cdef _Engine eng = self.engine
        cdef int r
        cdef rpc.watch * w
        if eng._closed:
            self._end(R_CANCEL)
            raise ClosedError(f"the {type(eng).__name__} was closed during the stream")
        self.pending.clear()
        self.pending_pos = 0
        if eng.ab.cancel.load():      # cancel() arrived between two native steps
            self._finish_event(R_CANCEL)
            return 0
        eng._arm(self)
        w = eng.model._rpcw
        try:
            if w != NULL:
                eng.model._rpc_guard()
                # the stream's timeout also bounds every wait for an RPC server
                w.arm(self.timeout_us)
            try:
                if not self.started:
                    self.started = True
                    mtp_cy_add(eng.st.calls, 1)
                    mtp_cy_add(eng.st.prompt_tokens, self.prompt.size())
                    r = eng._start(self)
                    if r == R_NONE:
                        r = eng._step(self)
                else:
                    r = eng._step(self)
            finally:
                if w != NULL:
                    w.disarm()
            eng._raise_interrupt()
        except Exception as exc:
            # text held back for a possible stop string was produced before the
            # error: deliver it first, then raise
            if self.held:
                self._flush()
            self._end(R_ERROR)
            if self.queue:
                self.deferred = exc
                return 0
            raise
        except BaseException:
            self._end(R_ERROR)
            raise
        if r != R_NONE:
            self._finish_event(r)
        return 0

    def __next__(self):
        cdef llama_token tok
        while True:
            if self.queue:
                return self.queue.pop(0)
            if self.deferred is not None:
                exc = self.deferred
                self.deferred = None
                raise exc
            if self.finished:
                raise StopIteration
            if self.pending_pos < self.pending.size():
                tok = self.pending[self.pending_pos]
                self.pending_pos += 1
                self._take(tok)
                continue
            # need more tokens: run one native step
            self._native_step()

    def _pull(self):
        """For the asyncio wrappers (run in a worker thread): return the next items, at
        most one native step's worth -- every item available without another native
        step; an empty list once the stream is over."""
        cdef llama_token tok
        try:
            out = [self.__next__()]
        except StopIteration:
            return []
        while True:
            if self.queue:
                out.append(self.queue.pop(0))
            elif self.deferred is not None or self.finished:
                break
            elif self.pending_pos < self.pending.size():
                tok = self.pending[self.pending_pos]
                self.pending_pos += 1
                self._take(tok)
            else:
                break
        return out
