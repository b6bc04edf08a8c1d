# Batch: many calls at once, one sequence each, in one target context and one MTP-head
# context (continuous batching; the loop is mtp_cy_loop in _loop.h).

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
      decision and its reason; a step of one sequence, while only one call
      generates, is decided by the one-sequence policy of ``MTP(n_draft="auto")``,
      ``stats()["policy"]["single"]``); an int 1..64 drafts that many every step;
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
    cdef readonly int n_ctx_total

    def __cinit__(self, *args, **kwargs):
        self._multi = True

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
        self._p_min = _as_float("p_min", p_min, 0.0, 1.0)
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
        self._open_loop(model, o, cp, self.n_seq, per_seq, MTPUnsupportedError)
        # the head catches up on at most this many positions when drafting resumes after plain
        # steps (a deep catch-up costs more than the few drafts it improves; output unchanged)
        self._plug_policy(_BATCH_LAG_WINDOW)
        self.loop.defer_auto_head = True     # many steps of a batch stay plain (_loop.h eager_head)
        self.loop.cache_ram = cache_ram if o["cache_prompt"] else 0
        self.n_ctx_total = total

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

    @property
    def p_min(self):
        """A draft ends at the first token whose head probability is below this."""
        return self._p_min

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
             "n_draft": self._n_draft if s.k_req < 0 else s.k_req, "p_min": self._p_min, "slot": s.slot,
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
        d["p_min"] = self._p_min
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
        for i in range(self.n_seq):
            sl = self.loop.slots[i].get()
            st = sl.state.load()
            row = {"slot": i, "state": _SLOT_STATES[st], "cached_tokens": mtp_cy_get(sl.n_cached) if sl.valid else 0}
            if st == MTP_CY_SLOT_FREE:       # (a running call may change them under us)
                row["checkpoints"] = sl.ckpts.size()
            else:
                row["call"] = {"iters": mtp_cy_get(sl.c_iters), "drafts_generated": mtp_cy_get(sl.c_gen),
                               "drafts_accepted": mtp_cy_get(sl.c_acc)}
            slots.append(row)
        d["slots"] = slots
        d["cache"] = dict(self._cache_stats(), host_states=mtp_cy_get(self.loop.saved_n),
                          host_bytes=mtp_cy_get(self.loop.saved_bytes), host_hits=mtp_cy_get(self.loop.saved_hits),
                          cache_ram=self.loop.cache_ram)
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
                # runs of a neighbouring length that keep its cost current, and the share of
                # the speed they lost against the choice (what prices the next one)
                "re_measuring": {"longer": {"runs": pol.probe_runs[0], "loss": round(pol.probe_loss[0], 4)},
                                 "shorter": {"runs": pol.probe_runs[1], "loss": round(pol.probe_loss[1], 4)}},
                # the steps of one sequence: decided by MTP's one-sequence policy
                "single": {"chosen": {k: self.policy.chosen[k] for k in range(self.k_max + 1)},
                           "current": self.policy.best, "iterations": self.policy.iter},
            }

    def reset_policy(self):
        """Forget what ``n_draft="auto"`` measured (costs and acceptance); it measures again."""
        self._check()
        self.loop.policy.configure(max(1, self.k_max))
        self.policy.configure(max(1, self.k_max))


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
