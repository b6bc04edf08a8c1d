# Session: plain (non-speculative) decoding of one sequence, the baseline of every MTP result.

cdef class Session(_Engine):
    """Plain decoding of one sequence: the baseline that MTP results are compared with.

    ``Session(model, *, n_ctx=2048, n_batch=None, n_ubatch=None, n_threads=None,
    n_threads_batch=None, flash_attn="auto", type_k="f16", type_v="f16",
    offload_kqv=True, cache_prompt=True, cache_checkpoints=8, checkpoint_every=2048)``

    ``n_threads=None`` uses every CPU this process may run on (the sessions of a
    process share CPU thread pools and the CPUs: with several calls open at once a
    step runs with its share of them, see :func:`mtp_cy.cpu_pools`; the thread
    that calls takes part in the work, so generation runs as fast from any
    thread).  The decode/sample loop runs with the GIL released.

    Prompt cache: the session keeps its state between calls, and a call whose
    prompt starts like the previous prompt plus the text generated after it only
    processes the rest (``stats()["prompt_tokens_cached"]`` counts the tokens it
    did not process again).  Models whose memory cannot be cut at any position
    (recurrent/hybrid ones such as Qwen3.5/3.6, sliding-window attention) go back
    to the latest state checkpoint at or before the first difference: one is
    taken at the end of each prompt and every ``checkpoint_every`` tokens of a
    long prompt, at most ``cache_checkpoints`` of them are kept (their memory is
    in ``stats()["cache"]``).  ``cache_prompt=False`` clears the state on every
    call; :meth:`clear_cache` drops it once.

    The session keeps its model alive; ``close()`` is idempotent and the
    session is a context manager.
    """

    def __init__(self, Model model not None, **options):
        o = self._begin_init(model, options, "Session")
        cdef llama_context_params cp = _context_params(o)
        self.model = model
        cdef llama_context * ctx = self._new_context(model._model, cp, "the context", MTPError)
        self._finish_init(model, ctx, o)

    def __repr__(self):
        return f"<mtp_cy.Session n_ctx={self.n_ctx}{' closed' if self.closed else ''}>"

    cdef int _step(self, _Stream s) except -1:
        """Decode the last token, sample the next one."""
        cdef int rc = 0, r
        cdef int n_past = self.toks.size()
        cdef llama_token tok
        cdef int64_t t0, t1, t2
        cdef rpc.watch * w = self.model._rpcw
        cdef bint rpc_bad = False
        cdef int n_vocab = llama_vocab_n_tokens(self.model._vocab)
        if n_past >= self.n_ctx:
            return R_CTX
        try:
            with nogil:
                t0 = ggml_time_us()
                self.batch.clear()
                self.batch.add(s.last, n_past, 0, True)
                rc = llama_process(self.ctx, LLAMA_PROCESS_TYPE_DECODE, self.batch.get())
                rpc_bad = w != NULL and w.any_failed()
                t1 = ggml_time_us()
                if rc == 0 and not rpc_bad:
                    self.toks.push_back(s.last)
                    mtp_cy_add(self.st.iters, 1)
                    tok = common_sampler_sample(s.smpl, self.ctx, 0, False)
                    if tok < 0:     # LLAMA_TOKEN_NULL
                        rc = 2      # the abort callback stopped the grammar's work (timeout / cancel)
                    else:
                        common_sampler_accept(s.smpl, tok, True)
                        s.last = tok
                        s.pending.push_back(tok)
                        if s.n_top >= 0:
                            s.lp_vals.push_back(mtp_cy_logprobs(llama_get_logits_ith(self.ctx, 0), n_vocab, tok,
                                                                s.n_top, s.lp_top_ids, s.lp_top_vals))
                t2 = ggml_time_us()
                mtp_cy_add(self.st.t_verify_us, t1 - t0)
                mtp_cy_add(self.st.t_sample_us, t2 - t1)
                mtp_cy_add(self.st.t_total_us, t2 - t0)
        except Exception as exc:
            raise _native_error(exc, "sampling") from None
        return self._check_rc(rc, "decoding")
