# Session: plain (non-speculative) decoding of one sequence, the baseline of every MTP result.

cdef int _prefill(llama_context * ctx, common_batch * batch, const llama_token * toks, int n,
                  int n_batch, bint last_output, int * out_idx) noexcept nogil:
    """Decode ``toks`` in chunks of ``n_batch`` at positions 0..n-1; return llama_process's code."""
    cdef int i = 0, j, m, rc
    while i < n:
        m = min(n_batch, n - i)
        batch.clear()
        for j in range(m):
            batch.add(toks[i + j], i + j, 0, last_output and (i + j == n - 1))
        rc = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch.get())
        if rc != 0:
            return rc
        out_idx[0] = m - 1
        i += m
    return 0


cdef class Session(_Engine):
    """Plain decoding of one sequence: the baseline that MTP results are compared with.

    ``Session(model, *, n_ctx=2048, n_batch=None, n_ubatch=None, n_threads=None,
    n_threads_batch=None, flash_attn="auto", type_k="f16", type_v="f16",
    offload_kqv=True)``

    ``n_threads=None`` uses every CPU this process may run on.  The KV cache is
    cleared on each call; the decode/sample loop runs with the GIL released.
    The session keeps its model alive; ``close()`` is idempotent and the
    session is a context manager.
    """

    def __init__(self, Model model not None, **options):
        model._check()
        o = _with_defaults(options, CONTEXT_DEFAULTS, "Session")
        cdef llama_context_params cp = _context_params(o)
        cp.abort_callback = _abort_cb
        cp.abort_callback_data = <void *>self.ab
        cdef llama_context * ctx
        model._rpc_guard()
        _take_errors()
        with nogil:
            ctx = llama_init_from_model(model._model, cp)
        if model._rpcw != NULL and model._rpcw.any_failed():
            if ctx != NULL:
                with nogil:
                    llama_free(ctx)
            model._rpc_check("creating the context")
        if ctx == NULL:
            raise MTPError(f"failed to create the context: {_take_errors() or 'unknown error'}")
        self.ctx = ctx
        self.batch = new common_batch(ctx)
        self.model = model
        model._retain()
        self._closed = False
        # llama.cpp pads n_ctx up (to 256); the limit we enforce is what the caller asked for
        self.n_ctx = min(<int>llama_n_ctx(ctx), <int>cp.n_ctx)
        self.n_batch = llama_n_batch(ctx)

    def __repr__(self):
        return f"<mtp_cy.Session n_ctx={self.n_ctx}{' closed' if self._closed else ''}>"

    def stats(self):
        """Cumulative statistics (same keys as :meth:`MTP.stats`; ``iters`` counts decode calls)."""
        d = self._stats()
        d["n_draft"] = 0
        return d

    cdef int _start(self, _Stream s) except -1:
        cdef int rc, n = s.prompt.size()
        cdef int64_t t0
        cdef rpc.watch * w = self.model._rpcw
        cdef bint rpc_bad = False
        self._running = 1
        with nogil:
            t0 = ggml_time_us()
            llama_memory_clear(llama_get_memory(self.ctx), True)
            rc = _prefill(self.ctx, self.batch, s.prompt.data(), n, self.n_batch, True, &s.out_idx)
            rpc_bad = w != NULL and w.any_failed()
            mtp_cy_add(self.st.t_prefill_us, ggml_time_us() - t0)
        self._running = 0
        if rpc_bad:
            self.model._rpc_check("processing the prompt", True)
        if rc != 0:
            return self._raise_rc(rc, "processing the prompt")
        s.n_past = n
        s.need_decode = False
        return R_NONE

    cdef int _step(self, _Stream s) except -1:
        cdef int rc = 0
        cdef llama_token tok
        cdef int64_t t0, t1, t2
        cdef rpc.watch * w = self.model._rpcw
        cdef bint rpc_bad = False
        if s.need_decode and s.n_past >= self.n_ctx:
            return R_CTX
        self._running = 1
        with nogil:
            t0 = ggml_time_us()
            if s.need_decode:
                self.batch.clear()
                self.batch.add(s.last, s.n_past, 0, True)
                rc = llama_process(self.ctx, LLAMA_PROCESS_TYPE_DECODE, self.batch.get())
                rpc_bad = w != NULL and w.any_failed()
                if rc == 0 and not rpc_bad:
                    s.n_past += 1
                    s.out_idx = 0
                    mtp_cy_add(self.st.iters, 1)
            t1 = ggml_time_us()
            if rc == 0 and not rpc_bad:
                tok = common_sampler_sample(s.smpl, self.ctx, s.out_idx, False)
                common_sampler_accept(s.smpl, tok, True)
                s.last = tok
                s.need_decode = True
                s.pending.push_back(tok)
            t2 = ggml_time_us()
            mtp_cy_add(self.st.t_verify_us, t1 - t0)
            mtp_cy_add(self.st.t_sample_us, t2 - t1)
            mtp_cy_add(self.st.t_total_us, t2 - t0)
        self._running = 0
        if rpc_bad:
            self.model._rpc_check("decoding", True)
        if rc != 0:
            return self._raise_rc(rc, "decoding")
        return R_NONE

    def stream(self, prompt, **options):
        """Generate text from ``prompt`` (a ``str`` or a sequence of token ids).

        Returns an iterator of ``str`` pieces, one per generated token (a
        multi-byte character split across tokens is yielded whole).  Options:
        ``max_tokens=256`` (exact bound), ``timeout=60.0`` seconds without a token
        before :class:`GenerationTimeout`, and the sampler options ``temp=0.8``
        (``<= 0`` is greedy), ``top_k=40``, ``top_p=0.95``, ``min_p=0.05``,
        ``seed=None`` (random), ``penalty_last_n=64``, ``penalty_repeat=1.0``,
        ``penalty_freq=0.0``, ``penalty_present=0.0``, ``grammar=None`` (GBNF)
        and ``grammar_root="root"``.  Unknown options raise ``TypeError``.

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
        """
        return self._open(prompt, options, False, "stream", 0)

    def stream_events(self, prompt, emit_stats_every=0, **options):
        """Like :meth:`stream` but yields event tuples (see :meth:`MTP.stream_events`).

        With ``stop=``, a token's event is yielded once all of its text is known
        not to start a stop string (its piece is then its own text), and the last
        event is ``("stop", the_string)`` when a stop string ended the stream."""
        return self._open(prompt, options, True, "stream_events",
                          _as_int("emit_stats_every", emit_stats_every, 0))

    def generate(self, prompt, **options):
        """Return the whole generated text (the joined :meth:`stream`)."""
        return "".join(self._open(prompt, options, False, "generate", 0))
