# MTP: speculative decoding where the draft model is the MTP head inside the same GGUF.

cdef class MTP(_Engine):
    """Multi-Token Prediction speculative decoding (the Python ``LlamaCppEx.MTP``).

    ``MTP(model, *, n_draft=3, n_ctx=2048, **context_options)`` builds the
    target context, the MTP draft context (``LLAMA_CONTEXT_TYPE_MTP`` against
    the same model) and upstream's ``common_speculative`` state (type
    draft-mtp).  Context options are those of :class:`Session` and apply to both
    contexts.  One sequence at a time; the same object serves any number of
    calls and clears both KV caches on each call.

    Raises :class:`MTPUnsupportedError` when the model has no MTP layers or was
    loaded with ``load_mtp=False``, ``ValueError`` when ``n_draft < 1``.

    The loop (one *iteration* = one verification decode of the target):

    1. the prompt minus its last token is prefilled (target + MTP head);
    2. ``n_max = min(n_draft, max_tokens - emitted - 1, n_ctx - n_past - 2)``
       tokens are drafted by the MTP head (no draft call when ``n_max <= 0``);
    3. ``[last, drafts...]`` is verified in one target decode;
    4. the longest prefix of drafts the sampler agrees with is accepted, plus
       the sampler's own next token, and they are emitted in order, so
       ``max_tokens`` is never exceeded.  The recurrent state of hybrid models
       (Qwen3.5/3.6 Gated-DeltaNet layers) is rolled back with llama.cpp's
       per-sequence snapshots (``n_rs_seq = n_draft``), as upstream does.

    When the target samples an end-of-generation token inside a verified batch,
    generation ends there: acceptance stops at that token (as upstream's
    ``common_sampler_sample_and_accept_n`` does), so ``drafts_accepted`` counts
    only the drafts confirmed *before* it (a draft that itself equals the
    end-of-generation token is not counted), the drafts after it are neither
    accepted nor emitted, ``iters`` counts the iteration, and ``tokens_emitted``
    counts the tokens delivered before it (the end-of-generation token is never
    emitted).
    """
    cdef llama_context * ctx_dft
    cdef common_speculative * spec
    cdef bint spec_dirty        # a native step was interrupted: rebuild the speculative state
    cdef readonly int n_draft

    def __init__(self, Model model not None, *, n_draft=3, **options):
        model._check()
        self.n_draft = _as_int("n_draft", n_draft)
        if self.n_draft < 1:
            raise ValueError(f"n_draft must be >= 1, got {n_draft}")
        if self.n_draft > 64:
            raise ValueError(f"n_draft must be <= 64, got {n_draft}")
        if model.n_layer_nextn <= 0:
            raise MTPUnsupportedError(
                f"{model.path!r} has no MTP (NextN) layers (architecture {model.arch!r}, "
                f"nextn_predict_layers = 0): MTP speculative decoding needs a GGUF that ships the MTP "
                f"head, e.g. an '*-MTP-GGUF' conversion of Qwen3.5/3.6; use mtp_cy.Session for plain decoding")
        if not model.has_mtp:
            raise MTPUnsupportedError(
                f"{model.path!r} was loaded with load_mtp=False, so its MTP layers are not in memory; "
                f"load it with mtp_cy.Model(path) (load_mtp=None or True)")
        o = _with_defaults(options, CONTEXT_DEFAULTS, "MTP")
        cdef llama_context_params cp = _context_params(o)
        # a verification batch is [last, drafts...] and, on hybrid/recurrent models, its
        # trailing n_draft + 1 tokens must stay in one ubatch (llama.cpp asserts otherwise)
        if <int>cp.n_ubatch < self.n_draft + 2:
            raise ValueError(
                f"n_ubatch is {cp.n_ubatch} but MTP with n_draft={self.n_draft} needs n_ubatch >= "
                f"n_draft + 2 = {self.n_draft + 2} (raise n_ubatch / n_batch / n_ctx, or lower n_draft)")
        cp.abort_callback = _abort_cb
        cp.abort_callback_data = <void *>self.ab
        cp.n_rs_seq = self.n_draft
        cp.n_outputs_max = min(cp.n_batch, 1 + self.n_draft)
        cp.n_outputs_max_per_seq = cp.n_outputs_max
        cdef llama_context * ctx
        cdef llama_context * dft
        model._rpc_guard()
        _take_errors()
        with nogil:
            ctx = llama_init_from_model(model._model, cp)
        if model._rpcw != NULL and model._rpcw.any_failed():
            if ctx != NULL:
                with nogil:
                    llama_free(ctx)
            model._rpc_check("creating the target context")
        if ctx == NULL:
            raise MTPError(f"failed to create the target context: {_take_errors() or 'unknown error'}")
        cp.ctx_type = LLAMA_CONTEXT_TYPE_MTP
        cp.n_rs_seq = 0
        cp.ctx_other = ctx
        with nogil:
            dft = llama_init_from_model(model._model, cp)
        if model._rpcw != NULL and model._rpcw.any_failed():
            with nogil:
                if dft != NULL:
                    llama_free(dft)
                llama_free(ctx)
            model._rpc_check("creating the MTP draft context")
        if dft == NULL:
            llama_free(ctx)
            raise MTPUnsupportedError(f"failed to create the MTP draft context for {model.path!r}: "
                                      f"{_take_errors() or 'unknown error'}")
        if llama_model_n_embd_out(llama_get_model(dft)) != llama_model_n_embd_out(llama_get_model(ctx)):
            llama_free(dft)
            llama_free(ctx)
            raise MTPUnsupportedError("MTP head width does not match the target's hidden width")
        self.ctx = ctx
        self.ctx_dft = dft
        self.batch = new common_batch(ctx)
        self.spec = NULL
        self.model = model
        model._retain()
        self._closed = False
        # llama.cpp pads n_ctx up (to 256); the limit we enforce is what the caller asked for
        self.n_ctx = min(<int>llama_n_ctx(ctx), <int>cp.n_ctx)
        self.n_batch = llama_n_batch(ctx)
        # fail now, not at the first call, if upstream refuses the speculative state
        self._new_spec()
        model._rpc_check("creating the speculative state")

    cdef void _free_native(self) noexcept:
        if self.spec != NULL:
            common_speculative_free(self.spec)
            self.spec = NULL
        if self.ctx_dft != NULL:
            llama_free(self.ctx_dft)
            self.ctx_dft = NULL
        _Engine._free_native(self)

    cdef int _new_spec(self) except -1:
        cdef common_params_speculative p
        if self.spec != NULL:
            common_speculative_free(self.spec)
            self.spec = NULL
        p.types.clear()
        p.types.push_back(COMMON_SPECULATIVE_TYPE_DRAFT_MTP)
        p.draft.n_max = self.n_draft
        p.draft.n_min = 0
        p.draft.p_min = 0.0
        p.draft.ctx_tgt = self.ctx
        p.draft.ctx_dft = self.ctx_dft
        try:
            self.spec = common_speculative_init(p, 1)
        except Exception as exc:
            raise MTPUnsupportedError(f"upstream refused MTP speculative decoding: {exc}") from None
        if self.spec == NULL:
            raise MTPUnsupportedError(f"common_speculative_init failed: {_take_errors() or 'unknown error'}")
        return 0

    def __repr__(self):
        return f"<mtp_cy.MTP n_draft={self.n_draft} n_ctx={self.n_ctx}{' closed' if self._closed else ''}>"

    def stats(self):
        """A snapshot of the cumulative statistics (lock-free; safe from any thread, any time).

        * ``iters``: verification decodes of the target (one per loop iteration);
        * ``drafts_generated``: draft tokens proposed by the MTP head;
        * ``drafts_accepted``: draft tokens the target confirmed;
        * ``acceptance_rate``: ``drafts_accepted / drafts_generated`` (0.0 when nothing was drafted);
        * ``tokens_emitted``: tokens delivered to the caller (end-of-generation not counted);
        * ``tokens_per_sec``: ``tokens_emitted`` over the native decode-loop time
          ``timing_us["total"]`` (prompt processing excluded);
        * ``timing_us``: microseconds spent in the MTP head (``draft``: drafting and
          its catch-up on verified tokens), in target verification decodes
          (``verify``), in sampling/acceptance (``sample``), in the whole decode
          loop (``total``) and in prompt processing (``prefill``);
        * ``n_draft``: the configured maximum draft length.

        Counters are cumulative over every call on this object (see :meth:`reset_stats`).
        """
        d = self._stats()
        d["n_draft"] = self.n_draft
        return d

    cdef dict _final_stats(self):
        d = self._stats()
        d["n_draft"] = self.n_draft
        return d

    def print_stats(self):
        """Write upstream's own speculative statistics (``common_speculative_print_stats``)
        for the last call to the ``"mtp_cy"`` logger at INFO level, and return them as a str."""
        self._check()
        if self.spec == NULL:
            return ""
        import tempfile
        fd, path = tempfile.mkstemp(prefix="mtp_cy_stats_", suffix=".log")
        os.close(fd)
        cdef bytes bpath = path.encode()
        cdef common_log * lg = common_log_main()
        cdef int thold = common_log_get_verbosity_thold()
        saved_out = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            import sys
            sys.stdout.flush()
            os.dup2(devnull, 1)
            common_log_set_prefix(lg, False)
            common_log_set_file(lg, bpath)
            common_log_set_verbosity_thold(LOG_LEVEL_TRACE)
            common_log_resume(lg)
            with nogil:
                common_speculative_print_stats(self.spec)
            common_log_pause(lg)   # drains the queue into the file
        finally:
            common_log_set_verbosity_thold(thold)
            common_log_set_file(lg, NULL)
            os.dup2(saved_out, 1)
            os.close(saved_out)
            os.close(devnull)
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        os.unlink(path)
        for line in text.splitlines():
            if line.strip():
                logger.info("%s", line.rstrip())
        return text

    cdef int _start(self, _Stream s) except -1:
        cdef int rc = 0, n = s.prompt.size() - 1, i = 0, j, m
        cdef bint ok = True
        cdef int64_t t0
        cdef rpc.watch * w = self.model._rpcw
        cdef bint rpc_bad = False
        # upstream's server keeps one speculative state per slot across requests and
        # calls begin() per request; we do the same, unless a step was interrupted
        if self.spec == NULL or self.spec_dirty:
            self._new_spec()
            self.spec_dirty = False
        s.history.clear()
        self._running = 1
        with nogil:
            t0 = ggml_time_us()
            llama_memory_clear(llama_get_memory(self.ctx), True)
            llama_memory_clear(llama_get_memory(self.ctx_dft), True)
            # prefill the prompt minus its last token on the target, then feed
            # each chunk to the MTP head (its catch-up decode)
            while i < n:
                m = min(self.n_batch, n - i)
                self.batch.clear()
                for j in range(m):
                    self.batch.add(s.prompt[i + j], i + j, 0, False)
                    s.history.push_back(s.prompt[i + j])
                rc = llama_process(self.ctx, LLAMA_PROCESS_TYPE_DECODE, self.batch.get())
                if rc != 0:
                    break
                ok = common_speculative_process(self.spec, self.batch[0])
                if not ok:
                    break
                i += m
            rpc_bad = w != NULL and w.any_failed()
            if rc == 0 and ok and not rpc_bad:
                common_speculative_begin(self.spec, 0, s.history)
            mtp_cy_add(self.st.t_prefill_us, ggml_time_us() - t0)
        self._running = 0
        if rc != 0 or not ok or rpc_bad:
            self.spec_dirty = True
        if rpc_bad:
            self.model._rpc_check("processing the prompt", True)
        if rc != 0 or (not ok and self._aborted()):
            return self._raise_rc(rc, "processing the prompt")
        if not ok:
            raise DecodeError(f"the MTP head failed on the prompt: {_take_errors() or 'no detail'}")
        s.n_past = n
        s.last = s.prompt[n]
        return R_NONE

    cdef int _step(self, _Stream s) except -1:
        cdef int rc = 0, n_max, i, n_acc
        cdef bint ok = True
        cdef int64_t t0, t1, t2, t3, t4
        cdef common_speculative_draft_params * dp
        cdef vector[llama_token] ids
        cdef llama_memory_t mem_tgt = llama_get_memory(self.ctx)
        cdef llama_memory_t mem_dft = llama_get_memory(self.ctx_dft)
        cdef rpc.watch * w = self.model._rpcw
        cdef bint rpc_bad = False
        if s.n_past + 1 > self.n_ctx - 1:
            return R_CTX
        n_max = min(self.n_draft, s.max_tokens - s.emitted - 1, self.n_ctx - s.n_past - 2)
        self._running = 1
        with nogil:
            t0 = ggml_time_us()
            s.draft.clear()
            if n_max > 0:
                dp = &common_speculative_get_draft_params(self.spec, 0)
                dp.drafting = True
                dp.n_max = n_max
                dp.pos0 = s.n_past
                dp.id_last = s.last
                dp.prompt = &s.history
                dp.result = &s.draft
                common_speculative_draft(self.spec)
                if <int>s.draft.size() > n_max:
                    s.draft.resize(n_max)
                # drop the draft's own entries from the MTP KV: the verified
                # batch is fed to the head again below, with the target's states
                llama_memory_seq_rm(mem_dft, 0, s.n_past, -1)
            t1 = ggml_time_us()
            self.batch.clear()
            self.batch.add(s.last, s.n_past, 0, True)
            for i in range(<int>s.draft.size()):
                self.batch.add(s.draft[i], s.n_past + 1 + i, 0, True)
            rc = llama_process(self.ctx, LLAMA_PROCESS_TYPE_DECODE, self.batch.get())
            t2 = ggml_time_us()
            if rc == 0:
                ok = common_speculative_process(self.spec, self.batch[0])
            # a failed RPC server answered with placeholders: nothing of this step is used
            rpc_bad = w != NULL and w.any_failed()
            t3 = ggml_time_us()
            if rc == 0 and ok and not rpc_bad:
                ids = common_sampler_sample_and_accept_n(s.smpl, self.ctx, s.draft, False)
                n_acc = <int>ids.size() - 1
                common_speculative_accept(self.spec, 0, <uint16_t>n_acc)
                s.history.push_back(s.last)
                for i in range(n_acc):
                    s.history.push_back(ids[i])
                s.n_past += 1 + n_acc
                s.last = ids.back()
                llama_memory_seq_rm(mem_tgt, 0, s.n_past, -1)
                llama_memory_seq_rm(mem_dft, 0, s.n_past, -1)
                s.pending = ids
                mtp_cy_add(self.st.iters, 1)
                mtp_cy_add(self.st.drafts_generated, s.draft.size())
                mtp_cy_add(self.st.drafts_accepted, n_acc)
            t4 = ggml_time_us()
            mtp_cy_add(self.st.t_draft_us, (t1 - t0) + (t3 - t2))
            mtp_cy_add(self.st.t_verify_us, t2 - t1)
            mtp_cy_add(self.st.t_sample_us, t4 - t3)
            mtp_cy_add(self.st.t_total_us, t4 - t0)
        self._running = 0
        if rc != 0 or not ok or self._aborted() or rpc_bad:
            self.spec_dirty = True
        if rpc_bad:
            self.model._rpc_check("verifying a draft", True)
        # an abort inside the MTP head's own decode (ok == False) is reported the same way
        if rc != 0 or (not ok and self._aborted()):
            return self._raise_rc(rc, "verifying a draft")
        if not ok:
            raise DecodeError(f"the MTP head failed: {_take_errors() or 'no detail'}")
        return R_NONE

    def stream(self, prompt, **options):
        """Generate text with MTP speculative decoding; an iterator of ``str`` pieces.

        One piece per accepted token (UTF-8 safe).  Ends on end-of-generation, on
        ``max_tokens`` (exact), on a stop string or by raising.  Options:
        ``max_tokens=256``, ``timeout=60.0``, ``stop=None`` and every sampler
        option of :meth:`Session.stream` (whose docstring describes ``stop``).
        ``emit_stats_every`` is accepted for parity with the seed API; stats
        events only appear in :meth:`stream_events`.
        """
        emit = options.pop("emit_stats_every", 0)
        _as_int("emit_stats_every", emit, 0)
        return self._open(prompt, options, False, "stream", 0)

    def stream_events(self, prompt, emit_stats_every=0, **options):
        """Like :meth:`stream` but yields event tuples:

        * ``("token", token_id, piece)`` per accepted token;
        * ``("stats", snapshot)`` every ``emit_stats_every`` tokens when > 0;
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
        return self._open(prompt, options, True, "stream_events",
                          _as_int("emit_stats_every", emit_stats_every, 0))

    def generate(self, prompt, **options):
        """Return the whole generated text (the joined :meth:`stream`)."""
        emit = options.pop("emit_stats_every", 0)
        _as_int("emit_stats_every", emit, 0)
        return "".join(self._open(prompt, options, False, "generate", 0))
