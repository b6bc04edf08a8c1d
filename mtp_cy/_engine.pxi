# The engine of Session, MTP and Batch: context creation (options, thread pool,
# RPC checks), lifetime (close from any thread or from a signal handler), the
# driver of the one generation loop (mtp_cy_loop in _loop.h: slots, prompt
# cache, draft / verify steps; a Session is its one-sequence case without a
# drafter, an MTP its one-sequence case with one, a Batch many sequences),
# statistics, and the public generation API (stream / stream_events / generate /
# chat / asyncio).  Each subclass only says what differs: its options, how many
# sequences, whether and how it drafts, its statistics.

cimport cython
from cpython.pythread cimport PyThread_get_thread_ident

# a stream's finish reasons
cdef enum:
    R_NONE = 0
    R_MAX = 1
    R_EOG = 2
    R_CTX = 3
    R_CANCEL = 4
    R_ERROR = 5
    R_STOP = 6

_KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16,
             "q8_0": GGML_TYPE_Q8_0, "q4_0": GGML_TYPE_Q4_0, "q4_1": GGML_TYPE_Q4_1,
             "iq4_nl": GGML_TYPE_IQ4_NL, "q5_0": GGML_TYPE_Q5_0, "q5_1": GGML_TYPE_Q5_1}
_FLOAT_KV_TYPES = ("f32", "f16", "bf16")
_FLASH_ATTN = {"auto": LLAMA_FLASH_ATTN_TYPE_AUTO, True: LLAMA_FLASH_ATTN_TYPE_ENABLED,
               False: LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": LLAMA_FLASH_ATTN_TYPE_ENABLED,
               "off": LLAMA_FLASH_ATTN_TYPE_DISABLED}

CONTEXT_DEFAULTS = {"n_ctx": 2048, "n_batch": None, "n_ubatch": None, "n_threads": None,
                    "n_threads_batch": None, "flash_attn": "auto", "type_k": "f16", "type_v": "f16",
                    "offload_kqv": True, "cache_prompt": True, "cache_checkpoints": 8,
                    "checkpoint_every": 2048}
CONTEXT_OPTIONS = tuple(CONTEXT_DEFAULTS)

_INT32_MAX = 0x7FFFFFFF

cdef enum:
    # positions the MTP head may lag behind (plain steps of n_draft="auto"): older ones
    # are not fed to it when drafting resumes (mtp_cy_drafter::skip_to)
    LAG_WINDOW = 256


def _default_threads():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


cdef dict _with_defaults(dict given, dict defaults, str where):
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s): {', '.join(sorted(unknown))}; "
                        f"allowed: {', '.join(defaults)}")
    d = dict(defaults)
    d.update(given)
    return d


cdef llama_context_params _context_params(dict o) except *:
    """Validate the context options (already defaulted) into llama_context_params.

    ``cp.n_ctx`` is llama.cpp's own rounding of the request (a multiple of 256, as
    llama.cpp pads it anyway) so that llama.cpp does not clamp the batch sizes to a
    small request; the engine enforces the requested ``n_ctx`` itself."""
    cdef llama_context_params cp = llama_context_default_params()
    n_ctx = _as_int("n_ctx", o["n_ctx"], 1, 1 << 24)
    n_ctx_pad = ((n_ctx + 255) // 256) * 256
    n_batch = o["n_batch"]
    n_batch = min(n_ctx_pad, 2048) if n_batch is None else _as_int("n_batch", n_batch, 1, 1 << 24)
    n_ubatch = o["n_ubatch"]
    n_ubatch = min(n_batch, 512) if n_ubatch is None else _as_int("n_ubatch", n_ubatch, 1, n_batch)
    nt = o["n_threads"]
    nt = _default_threads() if nt is None else _as_int("n_threads", nt, 1, 512)
    ntb = o["n_threads_batch"]
    ntb = nt if ntb is None else _as_int("n_threads_batch", ntb, 1, 512)
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
    for name in ("offload_kqv", "cache_prompt"):
        if not isinstance(o[name], bool):
            raise TypeError(f"{name} must be True or False, got {o[name]!r}")
    _as_int("cache_checkpoints", o["cache_checkpoints"], 0, 256)
    _as_int("checkpoint_every", o["checkpoint_every"], 1, 1 << 24)
    cp.n_ctx = n_ctx_pad
    cp.n_batch = n_batch
    cp.n_ubatch = n_ubatch
    cp.n_seq_max = 1
    cp.n_threads = nt
    cp.n_threads_batch = ntb
    cp.flash_attn_type = _FLASH_ATTN[fa]
    cp.type_k = _KV_TYPES[o["type_k"]]
    cp.type_v = _KV_TYPES[o["type_v"]]
    cp.offload_kqv = o["offload_kqv"]
    cp.no_perf = True
    return cp


cdef cbool _abort_cb(void * data) noexcept nogil:
    """Called by ggml between graph nodes: cancel, timeout and Ctrl-C handling."""
    cdef mtp_cy_abort * a = <mtp_cy_abort *> data
    cdef mtp_cy_abort * c = a.link
    cdef int64_t now
    if a.cancel.load() or a.interrupted or a.timed_out:
        return True     # sticky: every later graph (draft or target) aborts too
    if c != NULL:
        # a Session / MTP: its call's cancel() and deadline (the slot's) stop the decode too
        if c.cancel.load() or c.timed_out:
            return True
        if c.deadline_us != 0 and ggml_time_us() > c.deadline_us:
            c.timed_out = 1
            return True
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


cdef object _native_error(exc, str what):
    """The exception for a C++ exception that left llama.cpp while ``what``."""
    return NativeError(f"llama.cpp raised an exception while {what}: {exc}")


@cython.no_gc_clear
cdef class _Engine:
    """Base of Session, MTP and Batch: contexts, thread pool, the generation loop, statistics."""
    cdef readonly Model model
    cdef llama_context * ctx
    cdef llama_context * ctx_dft   # the MTP head's context (NULL: no drafter)
    cdef mtp_cy_loop * loop        # the generation loop (_loop.h): one slot per sequence
    cdef ggml_threadpool_t tp      # the shared CPU pool the contexts are attached to now (_native.h)
    cdef int _pool_threads         # the session's pool size (0: no pool)
    cdef int _cur_threads          # the thread count the contexts are set to now
    cdef bint _in_call             # a call (stream) is open and counted on the pool
    cdef mtp_cy_stats * st
    cdef mtp_cy_abort * ab
    cdef mtp_cy_flag * busy
    cdef bint _inited
    cdef bint _closed
    cdef int _running            # a native step is running (another thread may be waiting in close())
    cdef long _running_tid       # the thread running it
    cdef bint _close_pending     # close() was called from inside that step (a signal handler)
    cdef bint _multi             # many calls at once, one sequence each (mtp_cy.Batch)
    cdef object _spec_default    # spec_sampling of a call that does not say (None: rejection unless greedy)
    cdef readonly int n_ctx      # positions of one sequence
    cdef int n_threads
    cdef int n_threads_batch       # threads of a prompt chunk (llama.cpp's n_threads_batch)
    cdef bint cache_prompt
    # drafting
    cdef bint auto               # n_draft="auto"
    cdef int k_max               # the longest draft (0: no drafter)
    cdef int k_default           # the draft length of a call without n_draft= (-1: the policy's)
    cdef float _p_min            # a draft ends at a token the head is less sure of
    cdef object _n_draft
    cdef mtp_cy_policy * policy  # n_draft="auto": the one-sequence policy (_policy.h) of a step of one sequence
    cdef object _acc_key         # the sampler settings its acceptance was learned under
    # the slots: waiting calls, the thread that runs the next step
    cdef readonly int n_seq      # sequences at once (1: Session, MTP)
    cdef object _cond
    cdef bint _stepping
    cdef list _waiters
    cdef int _n_open
    cdef list _release_later
    cdef uint64_t _next_call
    cdef int64_t _clock
    cdef int _cancel_epoch
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self.ctx = NULL
        self.ctx_dft = NULL
        self.loop = new mtp_cy_loop()
        self.policy = new mtp_cy_policy()
        self.tp = NULL
        self._pool_threads = 0
        self._cur_threads = 0
        self._in_call = False
        self.st = new mtp_cy_stats()
        self.ab = new mtp_cy_abort()
        self.busy = new mtp_cy_flag()
        self._closed = True
        self._inited = False
        self._multi = False
        self.n_seq = 1
        self._stepping = False
        self._waiters = []
        self._release_later = []
        self._n_open = 0
        self._next_call = 0
        self._clock = 0
        self._cancel_epoch = 0
        self._cond = threading.Condition(threading.RLock())

    # -- construction ---------------------------------------------------------------
    cdef dict _begin_init(self, Model model, dict options, str kind):
        """Checks and options common to both kinds; returns the defaulted options."""
        if self._inited:
            raise MTPError(f"{kind}.__init__ called twice: create a new {kind} instead")
        model._check()
        if model._vocab_only:
            raise ValueError(f"{model.path!r} was loaded with vocab_only=True: it has no weights, only the "
                             f"tokenizer (tokenize/detokenize/chat templates); load it without vocab_only "
                             f"to create a {kind}")
        o = _with_defaults(options, CONTEXT_DEFAULTS, kind)
        return o

    cdef llama_context * _new_context(self, const llama_model * m, llama_context_params cp, str what,
                                      exc_type) except NULL:
        """Create a context (RPC failures and llama.cpp's reason reported) with the thread pool attached."""
        cdef llama_context * ctx
        self.model._rpc_guard()
        _take_errors()
        cp.abort_callback = _abort_cb
        cp.abort_callback_data = <void *>self.ab
        with nogil:
            ctx = llama_init_from_model(<llama_model *>m, cp)
        if self.model._rpcw != NULL and self.model._rpcw.any_failed():
            if ctx != NULL:
                with nogil:
                    llama_free(ctx)
            self.model._rpc_check(f"creating {what}")
        if ctx == NULL:
            raise exc_type(f"failed to create {what}: {_take_errors() or 'unknown error'}")
        if self.tp == NULL and self._pool_threads == 0:
            self._pool_threads = max(cp.n_threads, cp.n_threads_batch)
            self.tp = mtp_cy_threadpool_new(self._pool_threads)
        if self.tp != NULL:
            llama_attach_threadpool(ctx, self.tp, self.tp)
        return ctx

    cdef int _open_loop(self, Model model, dict o, llama_context_params cp, int n_seq, int n_ctx_seq,
                        exc_no_head) except -1:
        """Create the target context for ``n_seq`` sequences of ``n_ctx_seq`` positions (and the MTP
        head's context when ``self.k_max > 0``) and the generation loop over them; the object is
        usable from here on.  ``exc_no_head``: the error when the head's context cannot be made."""
        cp.n_seq_max = n_seq
        cp.kv_unified = True
        cp.n_rs_seq = self.k_max
        cp.n_outputs_max = min(cp.n_batch, n_seq * (1 + self.k_max))
        cp.n_outputs_max_per_seq = 1 + self.k_max
        self.model = model
        cdef llama_context * ctx = self._new_context(model._model, cp, "the target context", MTPError)
        cdef llama_context * dft = NULL
        try:
            if self.k_max > 0:
                cp.ctx_type = LLAMA_CONTEXT_TYPE_MTP
                cp.n_rs_seq = 0
                cp.ctx_other = ctx
                dft = self._new_context(model._mtp_model(), cp, "the MTP draft context", exc_no_head)
                if llama_model_n_embd_out(llama_get_model(dft)) != llama_model_n_embd_out(llama_get_model(ctx)):
                    raise MTPUnsupportedError("MTP head width does not match the target's hidden width")
            try:
                self.loop.init(ctx, dft, n_seq, self.k_max, self.auto)
            except Exception as exc:
                raise MTPUnsupportedError(f"cannot drive the MTP head: {exc}") from None
        except BaseException:
            self.loop.release()
            if dft != NULL:
                llama_free(dft)
            llama_free(ctx)
            self.tp = NULL
            if self._pool_threads > 0:
                mtp_cy_threadpool_free()
                self._pool_threads = 0
            raise
        self.ctx = ctx
        self.ctx_dft = dft
        self.n_seq = n_seq
        self.loop.st = self.st
        self.loop.max_checkpoints = o["cache_checkpoints"]
        self.loop.checkpoint_every = o["checkpoint_every"]
        model._retain()
        self._closed = False
        self._inited = True
        self.n_ctx = n_ctx_seq
        self.n_threads = <int>(o["n_threads"] or _default_threads())
        self.n_threads_batch = <int>(o["n_threads_batch"] or self.n_threads)
        self.cache_prompt = o["cache_prompt"]
        if not self._multi:
            # one sequence: its call's cancel and deadline stop a running decode too
            self.ab.link = &self.loop.slots[0].get().ab
        return 0

    cdef void _free_native(self) noexcept:
        self.ab.link = NULL
        if self.loop != NULL:
            self.loop.release()     # (the drafters' samplers and batches go before the contexts)
        if self.ctx_dft != NULL:
            llama_free(self.ctx_dft)
            self.ctx_dft = NULL
        if self.ctx != NULL:
            llama_free(self.ctx)
            self.ctx = NULL
        self._end_call()
        self.tp = NULL
        if self._pool_threads > 0:
            mtp_cy_threadpool_free()
            self._pool_threads = 0

    def __dealloc__(self):
        self._free_native()
        if self.loop != NULL:
            del self.loop
            self.loop = NULL
        del self.policy
        self.policy = NULL
        if self.model is not None and not self._closed:
            self.model._release()
        del self.st
        del self.ab
        del self.busy

    # -- lifetime ---------------------------------------------------------------------
    cdef _wait_idle(self):
        import time
        self.ab.cancel.store(1)
        while self._running:
            time.sleep(0.001)

    cdef void _do_close(self):
        self._closed = True
        self._close_pending = False
        self._free_native()
        self.model._release()

    def close(self):
        """Free the contexts (idempotent).  A running stream is cancelled first (on a
        :class:`Batch`, every call in flight ends with :class:`ClosedError`; calls waiting for
        a slot are woken and fail the same way).

        Safe from any thread, and from a signal handler: called while this
        object's own native step runs on the same thread (a handler for SIGTERM
        or SIGALRM runs inside llama.cpp's abort callback), it cancels the step
        and the close completes as soon as the step has returned."""
        if self._closed:
            return
        with self._cond:
            self._cond.notify_all()
        if self._running:
            if self._running_tid == <long>PyThread_get_thread_ident():
                self.ab.cancel.store(1)
                self._close_pending = True
                return
            self._wait_idle()
            if self._closed:
                return
        self._do_close()
        with self._cond:
            self._cond.notify_all()

    @property
    def closed(self):
        """``True`` once :meth:`close` was called."""
        return self._closed or self._close_pending

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    cdef inline void _check(self) except *:
        if self._closed or self._close_pending:
            raise ClosedError(f"this {type(self).__name__} is closed")

    def cancel(self):
        """Stop the running stream (on a :class:`Batch`, every call); safe from any thread
        (e.g. a UI or a watchdog).

        The native loop stops at the next ggml graph node (or before its next
        step); the stream then ends without an error: :meth:`stream` simply
        stops, :meth:`stream_events` ends with ``("done", stats)`` whose
        ``stats["stop_reason"]`` is ``"cancelled"``.  Tokens already produced
        are kept; calls waiting for a slot end too.  A ``cancel()`` made while
        no stream runs does not affect the next call.
        """
        cdef int i
        self._cancel_epoch += 1
        if self.loop != NULL and not self._closed:
            for i in range(<int>self.loop.slots.size()):
                if self.loop.slots[i].get().state.load() != MTP_CY_SLOT_FREE:
                    self.loop.slots[i].get().ab.cancel.store(1)
        with self._cond:
            self._cond.notify_all()

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
            "prompt_tokens_cached": mtp_cy_get(self.st.prompt_tokens_cached),
            "calls": mtp_cy_get(self.st.calls),
            "drafts_generated_by_pos": [self.st.gen_at(i) for i in range(self._n_pos())],
            "drafts_accepted_by_pos": [self.st.acc_at(i) for i in range(self._n_pos())],
            "spec_sampling": self._spec_default,
        }

    cdef int _n_pos(self):
        """How many draft positions the statistics list (the longest draft; 0: no drafts)."""
        return 0

    def stats(self):
        """A snapshot of the cumulative statistics (lock-free; safe from any thread, any time).

        * ``iters``: target decodes in the generation loop (one per iteration);
        * ``drafts_generated`` / ``drafts_accepted``: draft tokens proposed by the
          MTP head / confirmed by the target (0 for a :class:`Session`);
        * ``acceptance_rate``: ``drafts_accepted / drafts_generated`` (0.0 when nothing was drafted);
        * ``tokens_emitted``: tokens delivered to the caller (end-of-generation not counted);
        * ``tokens_per_sec``: ``tokens_emitted`` over the native decode-loop time
          ``timing_us["total"]`` (prompt processing excluded);
        * ``timing_us``: microseconds spent in the MTP head (``draft``: drafting and
          feeding it the verified tokens), in target decodes of the loop
          (``verify``), in sampling/acceptance (``sample``), in the whole decode
          loop (``total``) and in prompt processing (``prefill``);
        * ``prompt_tokens``: prompt tokens of every call; ``prompt_tokens_cached``:
          how many of them were not processed again because the session's state
          already held them (the prompt cache);
        * ``calls``: streams started;
        * ``drafts_generated_by_pos`` / ``drafts_accepted_by_pos``: lists, item ``i`` for draft
          position ``i + 1`` (one per position up to the longest draft; empty for a Session):
          tokens drafted there, and of those accepted (acceptance by position: their ratio);
        * ``spec_sampling``: the default rule of this engine's calls (``None``: ``"rejection"``
          whenever a call samples; a call's own statistics say which rule it used);
        * ``cache``: the prompt cache now (``tokens`` held, state ``checkpoints``
          and their ``checkpoint_bytes``);
        * ``n_draft``: the configured draft length (``0`` for a Session, ``"auto"``
          for an adaptive MTP, whose choices are under ``policy``).

        Counters are cumulative over every call on this object (see :meth:`reset_stats`).
        """
        d = self._stats()
        d["cache"] = self._cache_stats()
        self._more_stats(d)
        return d

    cdef void _more_stats(self, dict d) except *:
        d["n_draft"] = 0

    def reset_stats(self):
        """Set every cumulative counter back to zero."""
        mtp_cy_reset(self.st.iters); mtp_cy_reset(self.st.drafts_generated)
        mtp_cy_reset(self.st.drafts_accepted); mtp_cy_reset(self.st.tokens_emitted)
        mtp_cy_reset(self.st.prompt_tokens); mtp_cy_reset(self.st.prompt_tokens_cached)
        mtp_cy_reset(self.st.calls)
        self.st.reset_pos()
        mtp_cy_reset(self.st.t_draft_us); mtp_cy_reset(self.st.t_verify_us)
        mtp_cy_reset(self.st.t_sample_us); mtp_cy_reset(self.st.t_total_us)
        mtp_cy_reset(self.st.t_prefill_us)

    # -- prompt cache -----------------------------------------------------------------
    def clear_cache(self):
        """Drop the state kept from earlier calls (the next call processes its whole prompt;
        on a :class:`Batch`, every free slot's state and the host copies of evicted
        conversations; slots in use keep theirs).

        Raises :class:`SessionBusyError` on a Session or MTP while a stream is open."""
        self._check()
        cdef int i
        cdef mtp_cy_slot * sl
        if not self._multi and self.busy.held():
            raise SessionBusyError(f"this {type(self).__name__} is busy: close its open stream first")
        for i in range(self.n_seq):
            sl = self.loop.slots[i].get()
            if sl.state.load() == MTP_CY_SLOT_FREE:
                sl.valid = False
                sl.ckpts.clear()
        self.loop.clear_saved()

    cdef dict _cache_stats(self):
        """``stats()["cache"]``: the tokens the free slots hold, their state checkpoints."""
        cdef int i, st
        cdef int64_t cached = 0, n_ck = 0, ck_bytes = 0
        cdef mtp_cy_slot * sl
        if self.loop == NULL or self._closed:
            return {"tokens": 0, "checkpoints": 0, "checkpoint_bytes": 0}
        for i in range(self.n_seq):
            sl = self.loop.slots[i].get()
            st = sl.state.load()
            cached += mtp_cy_get(sl.n_cached) if sl.valid else 0
            if st == MTP_CY_SLOT_FREE or not self._multi:   # (another thread's call may change them)
                n_ck += sl.ckpts.size()
                ck_bytes += sl.ckpts.bytes()
        return {"tokens": cached, "checkpoints": n_ck, "checkpoint_bytes": ck_bytes}

    # -- native steps -----------------------------------------------------------------
    cdef int _arm(self, int64_t timeout_us) except -1:
        """Prepare the abort state before a native step."""
        self.ab.timed_out = 0
        self.ab.interrupted = 0
        self.ab.deadline_us = (ggml_time_us() + timeout_us) if timeout_us > 0 else 0
        self.ab.check_signals = threading.current_thread() is threading.main_thread()
        self.ab.next_signal_check_us = 0
        return 0

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

    cdef void _cancel_call(self, _Stream s) except *:
        s.cancel_req = True
        cdef mtp_cy_slot * sl
        if s.slot >= 0 and self.loop != NULL and not self._closed:
            sl = self.loop.slots[s.slot].get()
            if sl.call_id == s.call_id:
                sl.ab.cancel.store(1)
        with self._cond:
            self._cond.notify_all()

    # -- slots --------------------------------------------------------------------------
    cdef int _pick_slot(self, _Stream s):
        """The free slot whose memory shares the longest usable prefix with the prompt
        (then the least recently used one); -1 when none is free.  When a host copy of an
        evicted conversation shares more, the least recently used free slot is taken and
        told to restore that copy first (``cache_ram``)."""
        cdef int i, best = -1, L, bestL = -1, lru = -1
        cdef int64_t bestU = 0, lruU = 0
        cdef mtp_cy_slot * sl
        cdef int n = s.prompt.size()
        cdef uint64_t sid = 0
        cdef int Lh = 0
        for i in range(self.n_seq):
            sl = self.loop.slots[i].get()
            if sl.state.load() != MTP_CY_SLOT_FREE:
                continue
            L = self.loop.usable_prefix(i, s.prompt.data(), n) if self.cache_prompt else 0
            if L > bestL or (L == bestL and sl.last_used < bestU):
                best, bestL, bestU = i, L, sl.last_used
            if lru < 0 or sl.last_used < lruU:
                lru, lruU = i, sl.last_used
        if best >= 0:
            self.loop.slots[best].get().restore_id = 0
            if self.cache_prompt and self.loop.cache_ram > 0:
                Lh = self.loop.saved_prefix(s.prompt.data(), n, &sid)
                if sid != 0 and Lh > bestL:
                    best = lru
                    self.loop.slots[best].get().restore_id = sid
        return best

    cdef int _take_slot(self, _Stream s) except -1:
        """Wait (FIFO, bounded by the call's timeout) for a free slot and give it to ``s``;
        returns the slot, or -2 when the call was cancelled first."""
        ticket = object()
        cdef double deadline = (_time.monotonic() + s.timeout_us / 1e6) if s.timeout_us > 0 else 0
        cdef int epoch = self._cancel_epoch
        cdef int i = -1
        with self._cond:
            self._waiters.append(ticket)
            try:
                while True:
                    if self._closing():
                        raise ClosedError(f"the {type(self).__name__} was closed while this call waited for a slot")
                    if s.cancel_req or self._cancel_epoch != epoch:
                        return -2         # cancelled while waiting (-1 is the error return)
                    if self._waiters[0] is ticket:
                        i = self._pick_slot(s)
                        if i >= 0:
                            break
                    left = (deadline - _time.monotonic()) if deadline else 0.25
                    if deadline and left <= 0:
                        raise QueueTimeout(f"no free slot within the timeout ({s.timeout_us / 1e6:g} s): "
                                                f"all {self.n_seq} sequences are busy")
                    self._cond.wait(min(left, 0.25))
            finally:
                self._waiters.remove(ticket)
                self._cond.notify_all()
        cdef mtp_cy_slot * sl = self.loop.slots[i].get()
        self._next_call += 1
        self._clock += 1
        sl.call_id = self._next_call
        sl.last_used = self._clock
        sl.state.store(MTP_CY_SLOT_PROMPT)
        sl.end = MTP_CY_END_NONE
        sl.rc = 0
        sl.ab.cancel.store(0)
        sl.ab.deadline_us = 0
        sl.ab.timed_out = 0
        sl.ab.interrupted = 0
        sl.ab.check_signals = 0
        sl.smpl = s.smpl
        s.smpl = NULL
        common_sampler_set_abort_callback(sl.smpl, _abort_cb, <void *>&sl.ab)
        sl.spec = s.spec
        s.spec = NULL
        if sl.spec != NULL:
            common_sampler_set_abort_callback(sl.spec.ds, _abort_cb, <void *>&sl.ab)
        sl.max_new = s.max_tokens
        sl.generated = 0
        sl.n_ctx = self.n_ctx
        sl.k_req = s.k_req if s.k_req >= 0 else self.k_default
        sl.n_top = s.n_top
        sl.p_min = self._p_min
        sl.timeout_us = s.timeout_us if s.timeout_us > 0 else 0
        sl.out.clear()
        sl.groups.clear()
        sl.lp_vals.clear()
        sl.lp_top_ids.clear()
        sl.lp_top_vals.clear()
        sl.acc.reset()
        mtp_cy_reset(sl.c_iters); mtp_cy_reset(sl.c_gen); mtp_cy_reset(sl.c_acc)
        s.slot = i
        s.call_id = sl.call_id
        sl.prompt = s.prompt
        sl.ppos = 0
        sl.ckpt_hint = s.ckpt_hint
        sl.need_reuse = True
        sl.cache = self.cache_prompt
        sl.n_reused = 0
        sl.t_prefill_us = 0
        s.b_t_prefill = -1
        if s.cancel_req:
            sl.ab.cancel.store(1)
        self._n_open += 1
        if self._n_open == 1 and self.tp != NULL and not self._in_call:
            self._in_call = True
            mtp_cy_call_begin(self.tp)
        return i

    cdef void _free_slot(self, int i, uint64_t call_id) noexcept:
        cdef mtp_cy_slot * sl
        if self.loop == NULL or i < 0 or i >= <int>self.loop.slots.size():
            return
        sl = self.loop.slots[i].get()
        if sl.call_id != call_id or sl.state.load() == MTP_CY_SLOT_FREE:
            return
        if sl.spec != NULL:
            del sl.spec
            sl.spec = NULL
        if sl.smpl != NULL:
            common_sampler_free(sl.smpl)
            sl.smpl = NULL
        if sl.end == MTP_CY_END_ABORT or sl.end == MTP_CY_END_FAILED or sl.state.load() == MTP_CY_SLOT_PROMPT:
            sl.valid = False
        sl.out.clear()
        sl.groups.clear()
        sl.lp_vals.clear()
        sl.lp_top_ids.clear()
        sl.lp_top_vals.clear()
        sl.state.store(MTP_CY_SLOT_FREE)
        self._n_open -= 1
        if self._n_open == 0:
            self._end_call()

    cdef void _finish(self, _Stream s) noexcept:
        if s.slot < 0:
            return
        try:
            if self._stepping:
                self._release_later.append((s.slot, s.call_id))   # freed when the step has returned
            else:
                self._free_slot(s.slot, s.call_id)
            with self._cond:
                self._cond.notify_all()
        except BaseException:
            pass

    # -- the native loop ----------------------------------------------------------------
    cdef int _enter_step(self, double deadline) except -1:
        """Become the thread that runs the next native work; 0 when the deadline passed or the
        batch closed first (then the caller looks at its slot again)."""
        cdef bint got = False
        if not self._multi and not self._stepping:
            # one sequence: its stream is the only one that steps (the busy flag), so no lock
            if self._closing():
                return 0
            self._stepping = True
            self._running = 1
            self._running_tid = <long>PyThread_get_thread_ident()
            return 1
        try:
            with self._cond:
                while self._stepping:
                    if self._closing():
                        return 0
                    left = (deadline - _time.monotonic()) if deadline else 0.25
                    if deadline and left <= 0:
                        return 0
                    self._cond.wait(min(left, 0.25))
                    return 0          # something changed: the caller looks at its slot first
                if self._closing():
                    return 0
                self._stepping = True
                self._running = 1
                self._running_tid = <long>PyThread_get_thread_ident()
                got = True
        except BaseException:
            # a Ctrl-C raised by the lock's Python code must not leave the step taken
            if got:
                self._stepping = False
                self._running = 0
            raise
        return 1

    cdef int _leave_step(self) except -1:
        """The step has returned: free the slots released meanwhile, let the next thread in.
        The state changes come first: a Ctrl-C raised by the lock's Python code propagates
        and leaves nothing taken."""
        cdef tuple r
        self._stepping = False
        self._running = 0
        later, self._release_later = self._release_later, []
        for r in later:
            self._free_slot(r[0], r[1])
        if self._close_pending:
            self._do_close()
        if self._multi or self._waiters:
            with self._cond:
                self._cond.notify_all()
        return 0

    cdef inline bint _closing(self):
        # close() stops a running step through the contexts' abort flag (only close sets it)
        return self._closed or self._close_pending or self.ab.cancel.load() != 0

    cdef int _native(self, _Stream s) except -1:
        """One native step's worth of ``s``: its slot and prompt first, then one step's tokens."""
        cdef int r
        if self._closing():
            raise ClosedError(f"the {type(self).__name__} was closed during the stream")
        if not s.started:
            s.started = True
            if self._take_slot(s) < 0:
                return R_CANCEL
            mtp_cy_add(self.st.calls, 1)
            mtp_cy_add(self.st.prompt_tokens, s.prompt.size())
        return self._next_group(s)

    cdef int _next_group(self, _Stream s) except -1:
        cdef mtp_cy_slot * sl
        cdef mtp_cy_group g
        cdef int j, t, n_top
        cdef double now = _time.monotonic()
        cdef double d_gen = (now + s.timeout_us / 1e6) if s.timeout_us > 0 else 0
        cdef double d_prompt = (now + s.prompt_timeout_us / 1e6) if s.prompt_timeout_us > 0 else 0
        cdef double deadline
        cdef bint in_prompt = s.b_t_prefill < 0
        while True:
            if self._closing():
                raise ClosedError(f"the {type(self).__name__} was closed during the stream")
            sl = self.loop.slots[s.slot].get()
            if in_prompt and sl.state.load() != MTP_CY_SLOT_PROMPT:
                # the prompt is done: its share of the statistics, and the token timeout from now
                in_prompt = False
                s.n_cached = sl.n_reused
                s.b_t_prefill = sl.t_prefill_us
                mtp_cy_add(self.st.prompt_tokens_cached, sl.n_reused)
                mtp_cy_add(self.st.t_prefill_us, sl.t_prefill_us)
                d_gen = (_time.monotonic() + s.timeout_us / 1e6) if s.timeout_us > 0 else 0
            deadline = d_prompt if in_prompt else d_gen
            if sl.groups.size() > 0:
                sl.ab.deadline_us = 0
                g = sl.groups.front()
                sl.groups.pop_front()
                for j in range(g.n_tok):
                    s.pending.push_back(sl.out.front())
                    sl.out.pop_front()
                n_top = max(s.n_top, 0)
                for j in range(g.n_lp):
                    s.lp_vals.push_back(sl.lp_vals.front())
                    sl.lp_vals.pop_front()
                    for t in range(n_top):
                        s.lp_top_ids.push_back(sl.lp_top_ids.front())
                        sl.lp_top_ids.pop_front()
                        s.lp_top_vals.push_back(sl.lp_top_vals.front())
                        sl.lp_top_vals.pop_front()
                s.b_iters += 1
                s.b_gen += g.n_gen
                s.b_acc += g.n_acc
                _add_by_pos(s, g.n_gen, g.n_acc)
                s.b_t_draft += g.t_draft_us
                s.b_t_verify += g.t_verify_us
                s.b_t_sample += g.t_sample_us
                s.b_t_total += g.t_total_us
                return R_NONE
            if sl.end == MTP_CY_END_TOKENS:
                return R_MAX
            if sl.end == MTP_CY_END_CTX:
                return R_CTX
            if sl.end == MTP_CY_END_ABORT:
                if sl.ab.timed_out:
                    raise GenerationTimeout("no token within the timeout while sampling")
                return R_CANCEL
            if sl.end == MTP_CY_END_FAILED:
                what = "processing the prompt" if in_prompt else ("verifying a draft" if self.k_max > 0 else "decoding")
                if sl.rc == 2:
                    self._raise_interrupt()
                    if sl.ab.timed_out:     # one sequence: its deadline stopped the decode
                        raise GenerationTimeout(f"no token within the timeout while {what}")
                    return R_CANCEL
                raise DecodeError(f"llama.cpp failed while {what} (code {sl.rc}): {_take_errors() or 'no detail'}")
            if s.cancel_req or sl.ab.cancel.load():
                return R_CANCEL
            if deadline and _time.monotonic() > deadline:
                raise GenerationTimeout("no token within the timeout while " +
                                        ("processing the prompt" if in_prompt else "generating"))
            # the grammar's work in this call's sampler stops at the call's deadline
            sl.ab.deadline_us = (ggml_time_us() + <int64_t>((deadline - _time.monotonic()) * 1e6)) if deadline else 0
            if self._enter_step(deadline):
                try:
                    self._run_step(s)
                finally:
                    self._leave_step()
                if deadline and _time.monotonic() > deadline and sl.end == MTP_CY_END_NONE:
                    # this call's own step overran its timeout: its tokens came too late (one
                    # sequence aborts that decode instead; the others' steps cannot be stopped)
                    raise GenerationTimeout("no token within the timeout while " +
                                            ("processing the prompt" if in_prompt else "generating"))

    cdef int _run_step(self, _Stream s) except -1:
        """One step of the loop (prompt work, then a draft / verify iteration of every sequence
        generating), its threads taken from the process's CPU budget (_native.h)."""
        cdef int rc = 0, nt
        cdef int budget = max(64, <int>llama_n_ubatch(self.ctx))
        cdef rpc.watch * w = self.model._rpcw
        self._arm(0)
        if w != NULL:
            self.model._rpc_guard()
            if not self._multi:
                # the call's timeout also bounds every wait for an RPC server
                rpc.set_timeout(s.timeout_us if s.timeout_us > 0 else self.model._rpc_tus)
        nt = self._cpu_enter(self.n_threads_batch if self.loop.has_prompts() else self.n_threads)
        try:
            try:
                with nogil:
                    rc = self.loop.step(budget)
            except Exception as exc:
                self._fail_active()
                raise _native_error(exc, "drafting or verifying") from None
        finally:
            self._cpu_leave(nt)
            if w != NULL and not self._multi:
                rpc.set_timeout(self.model._rpc_tus)
        if self.loop.last_n > 0:
            mtp_cy_add(self.st.iters, self.loop.last_n)
            mtp_cy_add(self.st.t_draft_us, self.loop.t_draft_us)
            mtp_cy_add(self.st.t_verify_us, self.loop.t_verify_us)
            mtp_cy_add(self.st.t_sample_us, self.loop.t_sample_us)
            mtp_cy_add(self.st.t_total_us, self.loop.t_total_us)
        if w != NULL and w.any_failed():
            self._fail_active()
            self.model._rpc_check("verifying a draft", True)
        return 0

    cdef void _fail_active(self) noexcept:
        cdef int i
        cdef mtp_cy_slot * sl
        for i in range(self.n_seq):
            sl = self.loop.slots[i].get()
            if sl.state.load() == MTP_CY_SLOT_GEN and sl.end == MTP_CY_END_NONE:
                sl.end = MTP_CY_END_FAILED
                sl.rc = -1
                sl.valid = False

    cdef dict _stream_stats(self, _Stream s):
        """mtp_cy.Batch: the statistics of the call of stream ``s`` (its own counters)."""
        return {}

    cdef int _call_n_draft(self, value) except -2:
        """A call's ``n_draft=``: 0 (plain steps for this call) up to the engine's longest draft."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.k_max:
            name = type(self).__name__
            if self.k_max == 0:
                raise ValueError(f"n_draft={value!r}: this {name} has no MTP head to draft with (only 0)")
            raise ValueError(f"n_draft must be an int in [0, {self.k_max}] (the {name}'s n_draft_max) or None, "
                             f"got {value!r}")
        return value

    cdef bint _drafts(self):
        """Whether this engine drafts (a call's spec_sampling then matters)."""
        return False

    cdef void _sampler_opened(self, _Stream s) except *:
        """A call with sampler settings ``s.sp`` / ``s.spec_rule`` opens: the one-sequence
        policy forgets the acceptance it learned under other settings (it is stale)."""
        key = (s.spec_rule, s.sp.temp, s.sp.top_k, s.sp.top_p, s.sp.min_p, s.sp.penalty_last_n,
               s.sp.penalty_repeat, s.sp.penalty_freq, s.sp.penalty_present, not s.sp.grammar.grammar.empty())
        if self.auto and self._acc_key is not None and key != self._acc_key:
            self.policy.reset_acceptance()
        self._acc_key = key

    cdef void _plug_policy(self, int lag_window) noexcept:
        """After _open_loop: the head catches up on at most ``lag_window`` positions when
        drafting resumes; with n_draft="auto" the loop consults the one-sequence policy on
        every step of one sequence."""
        self.loop.lag_window = lag_window
        self.policy.configure(max(1, self.k_max))
        self.policy.lag_window = lag_window
        self.policy.p_min = self._p_min
        if self.auto:
            self.loop.solo = self.policy

    cdef void _end_call(self) noexcept:
        """The open call ends: its pool is paused unless another call uses it (_native.h)."""
        if self._in_call:
            self._in_call = False
            if self.tp != NULL:
                with nogil:
                    mtp_cy_call_end(self.tp, <void *>self)

    cdef int _cpu_enter(self, int n_threads) noexcept:
        """Take up to ``n_threads`` of the CPU budget and a free shared pool of that size for the
        next native work (blocks, FIFO; _native.h); the contexts follow the pool and the thread
        count when they changed.  Returns the threads taken (for _cpu_leave)."""
        cdef ggml_threadpool_t tp = self.tp
        cdef int n
        if tp == NULL:
            return n_threads
        cdef const void * who = <void *>self
        with nogil:
            n = mtp_cy_cpu_enter(&tp, n_threads, self._in_call, who)
        if tp != self.tp:
            self.tp = tp
            self._attach_pool(tp)
        if n != self._cur_threads:
            self._cur_threads = n
            self._set_threads(n)
        return n

    cdef void _cpu_leave(self, int n_threads) noexcept:
        if self.tp != NULL:
            mtp_cy_cpu_leave(self.tp, n_threads, <void *>self)

    cdef void _attach_pool(self, ggml_threadpool_t tp) noexcept:
        """Attach the contexts (the target's and the head's) to pool ``tp``."""
        llama_attach_threadpool(self.ctx, tp, tp)
        if self.ctx_dft != NULL:
            llama_attach_threadpool(self.ctx_dft, tp, tp)

    cdef void _set_threads(self, int n) noexcept:
        """Run the contexts' graphs with ``n`` threads."""
        llama_set_n_threads(self.ctx, n, n)
        if self.ctx_dft != NULL:
            llama_set_n_threads(self.ctx_dft, n, n)

    # -- streams ----------------------------------------------------------------------
    cdef _Stream _open(self, prompt, dict kw, bint events, str where, bint stats_events, int ckpt_hint=0):
        self._check()
        o = _with_defaults(kw, STREAM_DEFAULTS, where)
        emit = _as_int("emit_stats_every", o["emit_stats_every"], 0, _INT32_MAX)
        max_tokens = o["max_tokens"]
        max_tokens = self.n_ctx if max_tokens is None else _as_int("max_tokens", max_tokens, 1, _INT32_MAX)
        cdef int64_t timeout_us = _timeout_us(o["timeout"], "timeout")
        cdef int64_t prompt_timeout_us = _timeout_us(o["prompt_timeout"], "prompt_timeout")
        stops = _stop_strings(o["stop"])
        logprobs = o["logprobs"]
        if not isinstance(logprobs, bool):
            raise TypeError(f"logprobs must be True or False, got {logprobs!r}")
        top = _as_int("top_logprobs", o["top_logprobs"], 0, 20)
        if top and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if o["json_schema"] is not None:
            if o["grammar"] is not None:
                raise ValueError("pass either grammar= or json_schema=, not both")
            o["grammar"] = json_schema_to_grammar(o["json_schema"])
            o["grammar_root"] = "root"
        cdef _Stream s = _Stream.__new__(_Stream)
        s.prompt = self.model._prompt_tokens(prompt)
        if <int>s.prompt.size() >= self.n_ctx:
            raise ValueError(f"prompt is {s.prompt.size()} tokens but n_ctx is {self.n_ctx}; "
                             f"it must be shorter than n_ctx (raise n_ctx or shorten the prompt)")
        _fill_sampling(&s.sp, self.model._vocab, o, self.n_ctx)
        rule = _spec_rule(o["spec_sampling"])
        if rule is None:
            rule = self._spec_default
        # greedy: the two rules are the same (the target's argmax is kept iff drafted)
        s.spec_rule = "match" if (rule == "match" or s.sp.temp <= 0.0) else "rejection"
        s.smpl = _make_sampler(self.model._model, &s.sp)
        # timeout, cancel() and Ctrl-C reach into the grammar's work too (vendor/patches/0002)
        common_sampler_set_abort_callback(s.smpl, _abort_cb, <void *>self.ab)
        self._sampler_opened(s)
        if s.spec_rule == "rejection" and self._drafts():
            s.spec = new mtp_cy_spec()
            try:
                s.spec.init(self.model._model, s.smpl, s.sp, common_sampler_get_seed(s.smpl))
            except Exception as exc:
                del s.spec
                s.spec = NULL
                common_sampler_free(s.smpl)
                s.smpl = NULL
                raise ValueError(f"invalid sampler settings: {exc}") from None
            common_sampler_set_abort_callback(s.spec.ds, _abort_cb, <void *>self.ab)
        if o["n_draft"] is not None:
            s.k_req = self._call_n_draft(o["n_draft"])
        if self._multi:
            s.engine = self
            s.model = self.model
            self.model._retain()
            s.owns_busy = True
        elif not self.busy.try_acquire():
            common_sampler_free(s.smpl)
            s.smpl = NULL
            raise SessionBusyError(f"this {type(self).__name__} is busy: another stream on it is still open "
                                   "(exhaust or close() it first, or use a second session)")
        if not self._multi:
            s.engine = self
            s.model = self.model
            self.model._retain()      # a stream keeps the weights alive (its sampler refers to the vocabulary)
            s.owns_busy = True
        s.events = events
        s.max_tokens = max_tokens
        s.timeout_us = timeout_us
        s.prompt_timeout_us = prompt_timeout_us
        s.emit_stats_every = emit if (events and stats_events) else 0
        s.ckpt_hint = ckpt_hint
        s.n_top = top if logprobs else -1
        if logprobs:
            s.out_logprobs = []
        s.stats0 = self._stats()
        s.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        s.vocab = self.model._vocab
        s.queue = []
        s.stops = stops
        if stops is not None:
            s.max_stop = max(len(x) for x in stops)
        return s

    def stream(self, prompt, **options):
        """Generate text from ``prompt`` (a ``str`` or a sequence of token ids).

        Returns an iterator of ``str`` pieces, one per generated token (a
        multi-byte character split across tokens is yielded whole); the
        iterator also tells, once it ends, why (``finish_reason``) and which
        ``stop_string`` ended it.  Options:

        * ``max_tokens=256``: an exact bound on the generated tokens (``None``:
          until the context is full or the model ends the text);
        * ``timeout=60.0``: seconds to wait for the next token(s) before
          :class:`GenerationTimeout` (``None`` or ``inf``: no limit);
          ``prompt_timeout=None``: the same for processing the prompt (off by
          default: a long prompt on a CPU can take minutes);
        * the sampler options ``temp=0.8`` (``0`` is greedy), ``top_k=40``,
          ``top_p=0.95``, ``min_p=0.05``, ``seed=None`` (random),
          ``penalty_last_n=64`` (``-1``: the whole context), ``penalty_repeat=1.0``,
          ``penalty_freq=0.0``, ``penalty_present=0.0``, ``grammar=None`` (GBNF)
          and ``grammar_root="root"``;
        * ``spec_sampling=None`` (MTP / Batch, when sampling): how drafts are verified.
          ``"rejection"`` (the default for any ``temp > 0``) is speculative sampling: the
          head draws each draft token from its distribution under this call's sampler
          settings and the target keeps it with probability ``min(1, p/q)``, drawing from
          the residual on a rejection -- every token is distributed exactly as in plain
          sampling, and far more drafts are kept; ``"match"`` is upstream's rule (a draft
          token is kept when the target's own draw equals it), with which a seeded call
          gives the very text plain decoding gives with that seed.  Greedy calls are exact
          either way.  ``None`` takes the engine's ``spec_sampling``;
        * ``n_draft=None``: this call's draft length, overriding the engine's (``0``: plain
          steps for this call; at most the engine's ``n_draft_max``; a Session takes only 0);
        * ``emit_stats_every``: accepted for parity with the seed API; statistics
          events only appear in :meth:`stream_events`.

        Unknown options raise ``TypeError``.

        ``stop=None``: a string or a list of strings.  Generation ends as soon as
        the generated text contains one of them; the text before it is returned,
        the stop string itself and anything after it (even within the same token)
        are not.  While the end of the text could still be the beginning of a stop
        string it is held back, and released as soon as it cannot be one -- so with
        ``stop`` the pieces are the released chunks of text rather than one per
        token.  ``stream.finish_reason`` is then ``"stop"`` and
        ``stream.stop_string`` the string found.  An empty stop string raises
        ``ValueError``.  ``stats()["tokens_emitted"]`` counts delivered tokens: a
        token counts once all of its text was released; at a stop string, a token
        whose text begins before it counts once (its piece cut there), tokens
        inside or after it do not, nor do tokens generated after it (e.g. the rest
        of an MTP verification batch).  If the stream ends for another reason
        (``max_tokens``, end of generation, full context, ``cancel()``), the
        held-back text is released first; if it ends with an error, the held-back
        text is yielded before the exception is raised.

        The session keeps its state after the call: the next call reuses the
        longest prefix it shares with this prompt and its generated text (see
        ``cache_prompt``).
        """
        return self._open(prompt, options, False, "stream", False)

    def stream_events(self, prompt, **options):
        """Like :meth:`stream` but yields event tuples:

        * ``("token", token_id, piece)`` per generated token;
        * ``("stats", snapshot)`` every ``emit_stats_every`` tokens when > 0
          (keyword-only option, default 0);
        * then exactly one terminal event: ``("done", final_stats)`` when
          ``max_tokens`` was reached (or the context is full, or the stream was
          cancelled: ``final_stats["stop_reason"]`` says which), ``("eog", None)``
          when the model ended the text, or ``("stop", string)`` when the
          generated text contained one of the ``stop`` strings.

        With ``stop``, a token event is yielded once its whole text is known not to
        start a stop string; the token in which a stop string begins is yielded
        with its piece cut there, and the tokens inside or after the stop string
        are not yielded (nor counted in ``tokens_emitted``).

        An error raises from the iterator after the tokens already produced.
        """
        return self._open(prompt, options, True, "stream_events", True)

    def generate(self, prompt, **options):
        """Return the whole generated text (the joined :meth:`stream`)."""
        return "".join(self._open(prompt, options, False, "generate", False))

    def complete(self, prompt, **options):
        """Generate like :meth:`generate` and return this call's :class:`mtp_cy.Completion`:
        the text, the token ids, why it ended (``finish_reason`` in OpenAI's words and
        ``stop_reason`` in detail), ``usage`` (prompt, cached and completion tokens),
        this call's statistics and, with ``logprobs=True``, per-token log-probabilities."""
        s = self._open(prompt, options, False, "complete", False)
        for _ in s:
            pass
        return s.completion

    def complete_chat(self, messages, *, template=None, chat_template_kwargs=None, **options):
        """:meth:`chat` to the end, as a :class:`mtp_cy.Completion` whose ``message`` is the
        reply parsed by llama.cpp's chat parser (``content``, ``reasoning_content``,
        ``tool_calls``).  ``enable_thinking=`` and ``tools=`` are template variables."""
        s = self._open_chat(messages, template, chat_template_kwargs, options, False, "complete_chat")
        for _ in s:
            pass
        return s.completion

    # -- OpenAI-shaped results (mtp_cy/openai_compat.py) --------------------------------
    def create_completion(self, prompt, **kwargs):
        """OpenAI's ``/v1/completions`` on this session: a ``text_completion`` dict, or with
        ``stream=True`` an iterator of chunk dicts (see :mod:`mtp_cy.openai_compat`)."""
        from mtp_cy.openai_compat import create_completion
        return create_completion(self, prompt, **kwargs)

    def create_chat_completion(self, messages, **kwargs):
        """OpenAI's ``/v1/chat/completions`` on this session: a ``chat.completion`` dict, or
        with ``stream=True`` an iterator of ``chat.completion.chunk`` dicts (see
        :mod:`mtp_cy.openai_compat`)."""
        from mtp_cy.openai_compat import create_chat_completion
        return create_chat_completion(self, messages, **kwargs)

    # -- chat and asyncio ---------------------------------------------------------------
    cdef str _chat_prompt(self, messages, template, chat_template_kwargs, ChatParser parser=None):
        self._check()
        if chat_template_kwargs is None:
            kw = {}
        elif isinstance(chat_template_kwargs, _Mapping):
            kw = dict(chat_template_kwargs)
        else:
            raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        return self.model._apply_chat(messages, True, template, kw, parser)

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
        the model's end-of-turn token.  ``enable_thinking=`` and ``tools=`` may be
        given directly as keywords (they are template variables).  A malformed
        conversation raises ``ValueError`` naming the message index.

        ``stream.completion`` (when the stream has ended) has the reply parsed by
        llama.cpp's chat parser in ``.message``: ``content``, ``reasoning_content``
        (a ``<think>`` block) and ``tool_calls``.
        """
        return self._open_chat(messages, template, chat_template_kwargs, options, False, "chat")

    def chat_events(self, messages, *, template=None, chat_template_kwargs=None, **options):
        """Like :meth:`chat` but yields the event tuples of :meth:`stream_events`."""
        return self._open_chat(messages, template, chat_template_kwargs, options, True, "chat_events")

    cdef _Stream _open_chat(self, messages, template, chat_template_kwargs, dict options, bint events, str where):
        # the template variables every chat template knows can be passed as keywords
        # (as for Model.apply_chat_template): chat(messages, enable_thinking=False, tools=[...])
        extra = {k: options.pop(k) for k in ("enable_thinking", "tools") if k in options}
        extra = {k: v for k, v in extra.items() if v is not None}
        if extra:
            kw = dict(chat_template_kwargs or {})
            dup = set(kw) & set(extra)
            if dup:
                raise TypeError(f"{', '.join(sorted(dup))} given both as a keyword and in chat_template_kwargs")
            kw.update(extra)
            chat_template_kwargs = kw
        parser = ChatParser()
        prompt = self._chat_prompt(messages, template, chat_template_kwargs, parser)
        extra_stops = parser.additional_stops
        if extra_stops:
            # the template's format asks for these stops besides the end-of-turn token
            user = options.get("stop")
            user = [] if user is None else ([user] if isinstance(user, str) else list(user))
            options["stop"] = user + [x for x in extra_stops if x and x not in user]
        cdef _Stream s = self._open(prompt, options, events, where, events,
                                    self._chat_hint(messages, template, chat_template_kwargs, prompt))
        s.chat_parser = parser
        return s

    cdef int _chat_hint(self, messages, template, chat_template_kwargs, str prompt) except -1:
        """Where the next turn's prompt will leave this one: the conversation rendered with
        an assistant reply and a next user message after it (the reply is then history,
        as it will be) shares this many tokens with ``prompt``.  A state
        checkpoint there lets the next turn reuse the whole history even when the
        generation prompt is not part of it (e.g. Qwen3.5's ``<think>`` opener)."""
        if not (self.cache_prompt and self.loop.needs_checkpoints):
            return 0
        try:
            kw = dict(chat_template_kwargs or {})
            nxt = self.model._apply_chat(list(messages) + [{"role": "assistant", "content": "mtp_cy"},
                                                           {"role": "user", "content": "mtp_cy"}],
                                         False, template, kw)
        except Exception:
            return 0
        cdef vector[llama_token] a = self.model._tokenize(prompt.encode("utf-8"), True, True)
        cdef vector[llama_token] b = self.model._tokenize(nxt.encode("utf-8"), True, True)
        cdef size_t i = 0
        while i < a.size() and i < b.size() and a[i] == b[i]:
            i += 1
        return <int>i

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

    def astream_events(self, prompt, **options):
        """Async version of :meth:`stream_events` (see :meth:`astream`)."""
        from mtp_cy._aio import AsyncStream
        self._check()
        return AsyncStream(lambda: self.stream_events(prompt, **options))

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

    def achat_events(self, messages, *, template=None, chat_template_kwargs=None, **options):
        """Async version of :meth:`chat_events` (see :meth:`astream`)."""
        from mtp_cy._aio import AsyncStream
        self._check()
        return AsyncStream(lambda: self.chat_events(messages, template=template,
                                                    chat_template_kwargs=chat_template_kwargs, **options))


STREAM_DEFAULTS = dict(SAMPLER_DEFAULTS, max_tokens=256, timeout=60.0, prompt_timeout=None, stop=None,
                       emit_stats_every=0, logprobs=False, top_logprobs=0, json_schema=None, n_draft=None,
                       spec_sampling=None)
STREAM_OPTIONS = tuple(STREAM_DEFAULTS)
