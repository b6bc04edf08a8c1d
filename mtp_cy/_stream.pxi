# The machinery shared by Session and MTP: context options, the abort callback,
# statistics snapshots and the token stream (a plain Python iterator whose
# __next__ runs one native step with the GIL released).

_KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16,
             "q8_0": GGML_TYPE_Q8_0, "q4_0": GGML_TYPE_Q4_0, "q4_1": GGML_TYPE_Q4_1,
             "iq4_nl": GGML_TYPE_IQ4_NL, "q5_0": GGML_TYPE_Q5_0, "q5_1": GGML_TYPE_Q5_1}
_FLASH_ATTN = {"auto": LLAMA_FLASH_ATTN_TYPE_AUTO, True: LLAMA_FLASH_ATTN_TYPE_ENABLED,
               False: LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": LLAMA_FLASH_ATTN_TYPE_ENABLED,
               "off": LLAMA_FLASH_ATTN_TYPE_DISABLED}

CONTEXT_OPTIONS = ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "flash_attn",
                   "type_k", "type_v", "offload_kqv")
STREAM_OPTIONS = ("max_tokens", "timeout") + tuple(SAMPLER_DEFAULTS)

# a stream's finish reasons
DEF R_NONE = 0
DEF R_MAX = 1
DEF R_EOG = 2
DEF R_CTX = 3
DEF R_CANCEL = 4
DEF R_ERROR = 5


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
        raise ValueError(f"flash_attn must be 'auto', True or False, got {fa!r}")
    for name in ("type_k", "type_v"):
        if o[name] not in _KV_TYPES:
            raise ValueError(f"{name} must be one of {', '.join(_KV_TYPES)}, got {o[name]!r}")
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

    cdef int _raise_rc(self, int rc, str what) except -1:
        """Map a llama_process return code to an exception."""
        if rc == 2 or self.ab.cancel.load() or self.ab.timed_out or self.ab.interrupted:
            if self.ab.interrupted and _interrupt_holder:
                exc = _interrupt_holder.pop()
                del _interrupt_holder[:]
                raise exc
            if self.ab.timed_out:
                raise GenerationTimeout(f"no token within the timeout while {what}")
            return R_CANCEL
        raise DecodeError(f"llama.cpp failed while {what} (code {rc}): {_take_errors() or 'no detail'}")


STREAM_DEFAULTS = dict(SAMPLER_DEFAULTS, max_tokens=256, timeout=60.0)


cdef class _Stream:
    """Iterator over the output of one generation call (see Session.stream / MTP.stream)."""
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
    cdef int emitted
    cdef int emit_stats_every
    cdef int64_t timeout_us
    cdef object decoder
    cdef list queue
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

    @property
    def finish_reason(self):
        """``None`` while running, then ``"max_tokens"``, ``"eog"``, ``"ctx_full"``, ``"cancelled"`` or ``"error"``."""
        return (None, "max_tokens", "eog", "ctx_full", "cancelled", "error")[self.reason]

    cdef _finish_event(self, int reason):
        eng = self.engine
        self._end(reason)
        if self.events:
            if reason == R_EOG:
                self.queue.append(("eog", None))
            elif reason in (R_MAX, R_CTX, R_CANCEL):
                fs = eng._final_stats()
                fs["stop_reason"] = {R_MAX: "max_tokens", R_CTX: "ctx_full", R_CANCEL: "cancelled"}[reason]
                self.queue.append(("done", fs))
        # bytes of a character left incomplete when generation stopped are dropped (in
        # both modes), never yielded as a broken half or a replacement character

    def __next__(self):
        cdef llama_token tok
        cdef _Engine eng
        cdef int r
        while True:
            if self.queue:
                return self.queue.pop(0)
            if self.finished:
                raise StopIteration
            if self.pending_pos < self.pending.size():
                tok = self.pending[self.pending_pos]
                self.pending_pos += 1
                if llama_vocab_is_eog(self.vocab, tok):
                    self._finish_event(R_EOG)
                    continue
                piece = self.decoder.decode(self.engine.model._piece(tok))
                self.emitted += 1
                mtp_cy_add(self.engine.st.tokens_emitted, 1)
                if self.events:
                    self.queue.append(("token", tok, piece))
                    if self.emit_stats_every > 0 and self.emitted % self.emit_stats_every == 0:
                        self.queue.append(("stats", self.engine._stats()))
                elif piece:
                    self.queue.append(piece)
                if self.emitted >= self.max_tokens:
                    self._finish_event(R_MAX)
                continue
            # need more tokens: run one native step
            eng = self.engine
            if eng._closed:
                self._end(R_CANCEL)
                raise ClosedError(f"the {type(eng).__name__} was closed during the stream")
            self.pending.clear()
            self.pending_pos = 0
            if eng.ab.cancel.load():      # cancel() arrived between two native steps
                self._finish_event(R_CANCEL)
                continue
            eng._arm(self)
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
            except BaseException:
                self._end(R_ERROR)
                raise
            if r != R_NONE:
                self._finish_event(r)
