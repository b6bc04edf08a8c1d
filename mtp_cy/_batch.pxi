# Batch: many calls at once, one sequence each, in one target context and one MTP-head
# context (continuous batching; the loop is mtp_cy_loop in _batch.h).

import time as _time

_BATCH_MAX_SEQ = 64
_BATCH_CTX_PER_SEQ = 2048
_SLOT_STATES = ("free", "prompt", "generating")
_CACHE_RAM_DEFAULT = 1 << 30
_BATCH_LAG_WINDOW = 32


@cython.no_gc_clear
cdef class Batch(_Engine):
    """Many sequences at once: continuous batching with MTP speculative decoding.

    ``Batch(model, *, n_seq=4, n_draft="auto", n_draft_max=None, p_min=0.0,
    n_ctx=None, **context_options)`` creates one target context holding ``n_seq``
    sequences (a unified KV cache), one MTP-head context for all of them and one
    share of the process's CPU thread pools.  ``n_ctx`` is the total context;
    each sequence may use ``n_ctx // n_seq`` positions (default 2048 each).

    Every generating method of :class:`MTP` is here (``stream``, ``stream_events``,
    ``generate``, ``complete``, ``chat``, ``chat_events``, ``complete_chat``,
    ``create_completion``, ``create_chat_completion``, ``astream``,
    ``astream_events``, ``agenerate``, ``achat``, ``achat_events``) and **each may be
    called from many threads and asyncio tasks at once**: every call is one
    sequence.  A call beyond ``n_seq`` waits for a free slot, in arrival order,
    for at most its ``timeout``.  A step of the loop drafts for every sequence
    that drafts (one MTP-head decode per draft depth for all of them) and
    verifies every generating sequence in one target decode; sequences join
    (their prompt processed in chunks between steps) and leave between steps.

    * ``n_draft``: ``"auto"`` (default) chooses the draft length for the batch
      as it is, from the measured cost of verifying ``B*(k+1)`` tokens against
      ``B`` and the acceptance by draft position of each sequence, down to plain
      steps where the batch is compute-bound (``stats()["policy"]`` shows the
      decision and its reason); an int 1..64 drafts that many every step;
      ``0`` never drafts (the model then needs no MTP head).  A call may
      override it: ``stream(prompt, n_draft=0)`` (plain for this call) or
      ``n_draft=2``.
    * ``p_min``: a draft ends at the first token whose head probability is below it.
    * ``spec_sampling``: the default rule of sampled calls (``None``: rejection sampling
      whenever a call samples; ``"match"``: upstream's rule), see :meth:`MTP.stream`.
    * ``cache_ram`` (bytes, default 1 GiB; 0: off): a conversation that leaves its slot
      (the slot is taken by a call with another prompt) is copied to host memory, up to
      this bound (least recently used copies go first), and a later call that continues
      it gets it back in whatever slot is free, instead of processing its history again
      (``stats()["cache"]``: ``host_states``, ``host_bytes``, ``host_hits``).

    Greedy output and each call's own counters (``Completion.stats``) are those
    of the same call in a lone :class:`MTP` session with the same ``n_draft``,
    whatever else runs beside it; a seeded sampled call gives the same text
    whatever else runs.  Prompt cache: a call takes the free slot whose cached
    tokens share the longest prefix with its prompt (on recurrent/hybrid models
    a slot is reused when the prompt extends what it holds).  ``cancel()`` stops
    every call, a stream's ``close()`` its own; ``close()`` ends every call in
    flight with :class:`ClosedError`.
    """
    cdef llama_context * ctx_dft
    cdef mtp_cy_loop * loop
    cdef readonly int n_seq
    cdef readonly int n_ctx_total
    cdef object _n_draft
    cdef bint auto
    cdef int k_max
    cdef int k_default          # the draft length of a call without n_draft= (-1: auto)
    cdef readonly float p_min
    cdef object _cond
    cdef bint _stepping
    cdef list _waiters
    cdef int _n_open
    cdef list _release_later
    cdef uint64_t _next_call
    cdef int64_t _clock
    cdef int _cancel_epoch

    def __cinit__(self, *args, **kwargs):
        self.ctx_dft = NULL
        self.loop = new mtp_cy_loop()
        self._multi = True
        self._stepping = False
        self._waiters = []
        self._release_later = []
        self._n_open = 0
        self._next_call = 0
        self._clock = 0
        self._cancel_epoch = 0
        self._cond = threading.Condition(threading.RLock())

    def __dealloc__(self):
        if self.loop != NULL:
            self.loop.release()
            del self.loop
            self.loop = NULL
        if self.ctx_dft != NULL:
            llama_free(self.ctx_dft)
            self.ctx_dft = NULL

    def __init__(self, Model model not None, *, n_seq=4, n_draft="auto", n_draft_max=None, p_min=0.0,
                 n_ctx=None, cache_ram=_CACHE_RAM_DEFAULT, spec_sampling=None, **options):
        self.n_seq = _as_int("n_seq", n_seq, 1, _BATCH_MAX_SEQ)
        self._spec_default = _spec_rule(spec_sampling)
        if isinstance(cache_ram, bool) or not isinstance(cache_ram, int) or cache_ram < 0:
            raise ValueError(f"cache_ram must be an int >= 0 (bytes; 0 keeps no evicted state), got {cache_ram!r}")
        if n_ctx is None:
            n_ctx = _BATCH_CTX_PER_SEQ * self.n_seq
        options["n_ctx"] = n_ctx
        o = self._begin_init(model, options, "Batch")
        cdef bint has_head = model.has_mtp and model.n_layer_nextn <= 1 and \
            (model.n_layer_nextn > 0 or model._has_sidecar())
        if isinstance(n_draft, str):
            if n_draft != "auto":
                raise ValueError(f"n_draft must be an int in [0, {_MAX_N_DRAFT}] or 'auto', got {n_draft!r}")
            self.auto = has_head
            self.k_max = (_AUTO_MAX_DEFAULT if n_draft_max is None else
                          _as_int("n_draft_max", n_draft_max, 1, _AUTO_MAX)) if has_head else 0
            self.k_default = -1 if has_head else 0
        else:
            if isinstance(n_draft, bool) or not isinstance(n_draft, int) or not 0 <= n_draft <= _MAX_N_DRAFT:
                raise ValueError(f"n_draft must be an int in [0, {_MAX_N_DRAFT}] or 'auto', got {n_draft!r}")
            if n_draft_max is not None:
                if n_draft > 0:
                    raise ValueError("n_draft_max only applies to n_draft='auto' or 0")
                self.k_max = _as_int("n_draft_max", n_draft_max, 1, _MAX_N_DRAFT)
            else:
                self.k_max = n_draft
            self.auto = False
            self.k_default = n_draft
            if n_draft > 0 and not has_head:
                self._no_head(model)
            if not has_head:
                self.k_max = 0
        self._n_draft = n_draft
        self.p_min = _as_float("p_min", p_min, 0.0, 1.0)
        cdef int total = o["n_ctx"]
        cdef int per_seq = total // self.n_seq
        need = max(16, self.k_max + 2)
        if per_seq < need:
            raise ValueError(f"n_ctx={total} gives each of the n_seq={self.n_seq} sequences {per_seq} positions; "
                             f"each needs at least {need}: raise n_ctx to {need * self.n_seq} or more, "
                             f"or lower n_seq")
        cdef llama_context_params cp = _context_params(o)
        if self.k_max > 0 and <int>cp.n_ubatch < self.k_max + 2:
            raise ValueError(f"Batch with n_draft up to {self.k_max} verifies {self.k_max + 1} tokens per "
                             f"sequence and needs n_ubatch >= {self.k_max + 2}, but n_ubatch is {cp.n_ubatch}")
        cp.n_seq_max = self.n_seq
        cp.kv_unified = True
        cp.n_rs_seq = self.k_max
        cp.n_outputs_max = min(cp.n_batch, self.n_seq * (1 + self.k_max))
        cp.n_outputs_max_per_seq = 1 + self.k_max
        self.model = model
        cdef llama_context * ctx = self._new_context(model._model, cp, "the target context", MTPError)
        cdef llama_context * dft = NULL
        try:
            if self.k_max > 0:
                cp.ctx_type = LLAMA_CONTEXT_TYPE_MTP
                cp.n_rs_seq = 0
                cp.ctx_other = ctx
                dft = self._new_context(model._mtp_model(), cp, "the MTP draft context", MTPUnsupportedError)
                if llama_model_n_embd_out(llama_get_model(dft)) != llama_model_n_embd_out(llama_get_model(ctx)):
                    raise MTPUnsupportedError("MTP head width does not match the target's hidden width")
            try:
                self.loop.init(ctx, dft, self.n_seq, self.k_max, self.auto)
                self.loop.st = self.st
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
        self.ctx_dft = dft
        # the head catches up on at most this many positions when drafting resumes after plain
        # steps (a deep catch-up costs more than the few drafts it improves; output unchanged)
        self.loop.lag_window = _BATCH_LAG_WINDOW
        self.loop.cache_ram = cache_ram if o["cache_prompt"] else 0
        self.loop.max_checkpoints = o["cache_checkpoints"]
        self.loop.checkpoint_every = o["checkpoint_every"]
        self._finish_init(model, ctx, o)
        self.n_ctx = per_seq
        self.n_ctx_total = total
        self.cache_valid = True

    cdef int _no_head(self, Model model) except -1:
        if model.n_layer_nextn > 1:
            raise MTPUnsupportedError(
                f"{model.path!r} has {model.n_layer_nextn} chained MTP heads; mtp_cy drives a single MTP head: "
                f"use n_draft=0 (plain batched decoding)")
        if model.n_layer_nextn > 0 and not model.has_mtp:
            raise MTPUnsupportedError(f"{model.path!r} was loaded with load_mtp=False: load it with "
                                      f"mtp_cy.Model(path) to draft, or use n_draft=0")
        raise MTPUnsupportedError(f"{model.path!r} has no MTP head (architecture {model.arch!r}): "
                                  f"use n_draft=0 or 'auto' (plain batched decoding), or an MTP GGUF / sidecar")

    cdef void _attach_pool(self, ggml_threadpool_t tp) noexcept:
        llama_attach_threadpool(self.ctx, tp, tp)
        if self.ctx_dft != NULL:
            llama_attach_threadpool(self.ctx_dft, tp, tp)

    cdef void _set_threads(self, int n) noexcept:
        llama_set_n_threads(self.ctx, n, n)
        if self.ctx_dft != NULL:
            llama_set_n_threads(self.ctx_dft, n, n)

    cdef void _free_native(self) noexcept:
        if self.loop != NULL:
            self.loop.release()
        if self.ctx_dft != NULL:
            llama_free(self.ctx_dft)
            self.ctx_dft = NULL
        _Engine._free_native(self)

    @property
    def n_draft(self):
        """The configured draft length: an int (0: plain), or ``"auto"``."""
        return self._n_draft

    @property
    def n_draft_max(self):
        """The longest draft a call may make (0 without an MTP head)."""
        return self.k_max

    def __repr__(self):
        return (f"<mtp_cy.Batch n_seq={self.n_seq} n_draft={self._n_draft!r} n_ctx={self.n_ctx_total}"
                f"{' closed' if self.closed else ''}>")

    cdef int _call_n_draft(self, value) except -2:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.k_max:
            if self.k_max == 0:
                raise ValueError(f"n_draft={value!r}: this Batch has no MTP head to draft with (only 0)")
            raise ValueError(f"n_draft must be an int in [0, {self.k_max}] (the Batch's n_draft_max) or None, "
                             f"got {value!r}")
        return value

    # -- lifetime ---------------------------------------------------------------------
    def close(self):
        """Free the contexts (idempotent).  Every call in flight ends with :class:`ClosedError`
        (a running step is stopped first); calls waiting for a slot are woken and fail the same way."""
        if self._closed:
            return
        with self._cond:
            self._cond.notify_all()
        _Engine.close(self)
        with self._cond:
            self._cond.notify_all()

    def cancel(self):
        """Stop every call: each stream ends as after its own ``cancel`` (finish reason
        ``"cancelled"``, tokens already produced kept); calls waiting for a slot end too.
        Safe from any thread."""
        cdef int i
        self._cancel_epoch += 1
        if self.loop != NULL:
            for i in range(<int>self.loop.slots.size()):
                if self.loop.slots[i].get().state.load() != MTP_CY_SLOT_FREE:
                    self.loop.slots[i].get().ab.cancel.store(1)
        with self._cond:
            self._cond.notify_all()

    cdef void _cancel_call(self, _Stream s) except *:
        s.cancel_req = True
        cdef mtp_cy_slot * sl
        if s.slot >= 0 and self.loop != NULL and not self._closed:
            sl = self.loop.slots[s.slot].get()
            if sl.call_id == s.call_id:
                sl.ab.cancel.store(1)
        with self._cond:
            self._cond.notify_all()

    def clear_cache(self):
        """Drop the state every free slot keeps from earlier calls (slots in use keep theirs)
        and the host copies of evicted conversations."""
        self._check()
        cdef int i
        cdef mtp_cy_slot * sl
        for i in range(self.n_seq):
            sl = self.loop.slots[i].get()
            if sl.state.load() == MTP_CY_SLOT_FREE:
                sl.valid = False
                sl.ckpts.clear()
        self.loop.clear_saved()

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
                        raise ClosedError("the Batch was closed while this call waited for a slot")
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
        sl.p_min = self.p_min
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
        return 1

    cdef void _leave_step(self) noexcept:
        cdef tuple r
        try:
            with self._cond:
                self._stepping = False
                self._running = 0
                later, self._release_later = self._release_later, []
                for r in later:
                    self._free_slot(r[0], r[1])
                self._cond.notify_all()
            if self._close_pending:
                self._do_close()
        except BaseException:
            pass

    cdef inline bint _closing(self):
        # close() stops a running step through the contexts' abort flag (only close sets it)
        return self._closed or self._close_pending or self.ab.cancel.load() != 0

    cdef int _native(self, _Stream s) except -1:
        """One native step's worth of ``s``: its slot and prompt first, then one step's tokens."""
        cdef int r
        if self._closing():
            raise ClosedError("the Batch was closed during the stream")
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
                raise ClosedError("the Batch was closed during the stream")
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
                if sl.rc == 2:
                    self._raise_interrupt()
                    return R_CANCEL
                raise DecodeError(f"llama.cpp failed while verifying a draft (code {sl.rc}): "
                                  f"{_take_errors() or 'no detail'}")
            if s.cancel_req or sl.ab.cancel.load():
                return R_CANCEL
            if deadline and _time.monotonic() > deadline:
                raise GenerationTimeout("no token within the timeout while " +
                                        ("processing the prompt" if in_prompt else "generating"))
            # the grammar's work in this call's sampler stops at the call's deadline
            sl.ab.deadline_us = (ggml_time_us() + <int64_t>((deadline - _time.monotonic()) * 1e6)) if deadline else 0
            if self._enter_step(deadline):
                try:
                    self._run_step()
                finally:
                    self._leave_step()

    cdef int _run_step(self) except -1:
        cdef int rc = 0, nt
        cdef int budget = max(64, <int>llama_n_ubatch(self.ctx))
        cdef rpc.watch * w = self.model._rpcw
        self._arm(0)
        if w != NULL:
            self.model._rpc_guard()
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

    # -- statistics -----------------------------------------------------------------------
    cdef dict _stream_stats(self, _Stream s):
        npos = self._n_pos()
        gp = s.b_gen_pos or []
        ap = s.b_acc_pos or []
        d = {"iters": s.b_iters, "drafts_generated": s.b_gen, "drafts_accepted": s.b_acc,
             "acceptance_rate": (s.b_acc / s.b_gen) if s.b_gen else 0.0,
             "drafts_generated_by_pos": [gp[i] if i < len(gp) else 0 for i in range(npos)],
             "drafts_accepted_by_pos": [ap[i] if i < len(ap) else 0 for i in range(npos)],
             "tokens_emitted": s.delivered, "calls": 1,
             "timing_us": {"draft": s.b_t_draft, "verify": s.b_t_verify, "sample": s.b_t_sample,
                           "total": s.b_t_total, "prefill": s.b_t_prefill},
             "tokens_per_sec": (s.delivered * 1e6 / s.b_t_total) if s.b_t_total > 0 else 0.0,
             "prompt_tokens": <int>s.prompt.size(), "prompt_tokens_cached": s.n_cached,
             "n_draft": self._n_draft if s.k_req < 0 else s.k_req, "p_min": self.p_min, "slot": s.slot,
             "spec_sampling": s.spec_rule}
        return d

    cdef bint _drafts(self):
        return self.k_max > 0

    cdef int _n_pos(self):
        return min(self.k_max, 64)

    cdef void _more_stats(self, dict d) except *:
        cdef int i, k
        cdef mtp_cy_slot * sl
        cdef mtp_cy_batch_policy * pol
        d["n_draft"] = self._n_draft
        d["p_min"] = self.p_min
        d["n_seq"] = self.n_seq
        if self.loop == NULL or self._closed:
            d["cache"] = {"tokens": 0, "checkpoints": 0, "checkpoint_bytes": 0}
            return
        steps = mtp_cy_get(self.loop.steps)
        seq_steps = mtp_cy_get(self.loop.seq_steps)
        d["batch"] = {"n_seq": self.n_seq, "size": self.loop.batch_size.load(), "steps": steps,
                      "mean_size": (seq_steps / steps) if steps else 0.0,
                      "waiting": len(self._waiters)}
        slots = []
        cached = 0
        n_ck = 0
        ck_bytes = 0
        for i in range(self.n_seq):
            sl = self.loop.slots[i].get()
            st = sl.state.load()
            c = mtp_cy_get(sl.n_cached) if sl.valid else 0
            cached += c
            row = {"slot": i, "state": _SLOT_STATES[st], "cached_tokens": c}
            if st == MTP_CY_SLOT_FREE:       # (a running call may change them under us)
                row["checkpoints"] = sl.ckpts.size()
                n_ck += sl.ckpts.size()
                ck_bytes += sl.ckpts.bytes()
            if st != MTP_CY_SLOT_FREE:
                row["call"] = {"iters": mtp_cy_get(sl.c_iters), "drafts_generated": mtp_cy_get(sl.c_gen),
                               "drafts_accepted": mtp_cy_get(sl.c_acc)}
            slots.append(row)
        d["slots"] = slots
        d["cache"] = {"tokens": cached, "checkpoints": n_ck, "checkpoint_bytes": ck_bytes,
                      "host_states": mtp_cy_get(self.loop.saved_n), "host_bytes": mtp_cy_get(self.loop.saved_bytes),
                      "host_hits": mtp_cy_get(self.loop.saved_hits), "cache_ram": self.loop.cache_ram}
        if self.auto:
            pol = &self.loop.policy
            B = max(1, pol.last.n_seq)
            d["policy"] = {
                "k": pol.last.k, "reason": pol.last.reason.decode() if pol.last.reason != NULL else None,
                "batch_size": pol.last.n_seq,
                "expected_tokens_per_sec": round(pol.last.tokens_per_sec, 1),
                "expected_plain_tokens_per_sec": round(pol.last.plain_tokens_per_sec, 1),
                "chosen": {k: pol.chosen[k] for k in range(self.k_max + 1)},
                "steps": pol.steps,
                "verify_us": {B * (k + 1): round(pol.target.predict(B * (k + 1)), 1) for k in range(self.k_max + 1)},
                "head_us": {B: round(pol.head.predict(B), 1)},
                "acceptance_by_position": {k: round(pol.batch_acc.p(k, NULL), 4) for k in range(1, self.k_max + 1)},
            }

    def reset_policy(self):
        """Forget what ``n_draft="auto"`` measured (costs and acceptance); it measures again."""
        self._check()
        self.loop.policy.configure(max(1, self.k_max))

    def print_stats(self):
        """Write a summary of the speculative statistics (upstream's format, plus the batch size)
        to the ``"mtp_cy"`` logger at INFO level and return it as a str."""
        st = self.stats()
        iters = st["iters"]
        gen, acc = st["drafts_generated"], st["drafts_accepted"]
        mean = 1.0 + acc / iters if iters else 0.0
        b = st.get("batch", {})
        line = (f"statistics {'draft-mtp':>16}: #calls(b,g,a) = {st['calls']:4d} {iters:6d} {iters:6d}, "
                f"#gen tokens = {gen:6d}, #acc tokens = {acc:5d}, #mean acc len = {mean:.2f}, "
                f"acceptance = {100.0 * st['acceptance_rate']:.3f}%, dur(draft,verify,sample) = "
                f"{st['timing_us']['draft'] / 1000.0:.3f}, {st['timing_us']['verify'] / 1000.0:.3f}, "
                f"{st['timing_us']['sample'] / 1000.0:.3f} ms, batch steps = {b.get('steps', 0)}, "
                f"mean batch = {b.get('mean_size', 0.0):.2f}" + _by_pos_text(st))
        logger.info("%s", line)
        return line + "\n"
