# MTP: speculative decoding where the draft model is the MTP head of the same GGUF: the
# generation loop (_loop.h) with one sequence, its drafter, and (n_draft="auto") the
# one-sequence policy of _policy.h.

_MAX_N_DRAFT = 64        # a fixed draft length
_AUTO_MAX = 16           # n_draft="auto": mtp_cy_policy::KMAX
_AUTO_MAX_DEFAULT = 4


@cython.no_gc_clear
cdef class MTP(_Engine):
    """Multi-Token Prediction speculative decoding (the Python ``LlamaCppEx.MTP``).

    ``MTP(model, *, n_draft=3, p_min=0.0, n_ctx=2048, **context_options)`` builds
    the target context and the MTP draft context (``LLAMA_CONTEXT_TYPE_MTP``
    against the same model, or against the model's MTP sidecar).  Context
    options are those of :class:`Session` (prompt cache included) and apply to
    both contexts.  One sequence at a time; the same object serves any number
    of calls.

    * ``n_draft``: the number of tokens the MTP head drafts per iteration
      (1..64), or ``"auto"``: the loop picks the length every iteration --
      including 0, a plain decoding step -- from what it measures in this
      session (the cost of a draft token, of verifying k+1 tokens, of feeding
      the head, and the acceptance by draft position), to maximise tokens per
      second; ``n_draft_max`` (1..16, default 4) bounds it.  It also calibrates
      the draft's confidence and stops drafting at a token whose calibrated
      acceptance does not pay for itself (a learned, priced ``p_min``).  The
      output is the same for every setting: only the speed changes.
    * ``p_min``: drafting stops at the first draft token whose probability
      (as the MTP head's top-10 sampler computes it, upstream's
      ``--spec-draft-p-min``; with rejection sampling, the drawn token's
      probability under the head's sampled distribution) is below it; 0.0
      (default) never stops early.
    * ``spec_sampling``: the default rule of sampled calls, ``None`` (rejection
      sampling whenever a call samples), ``"rejection"`` or ``"match"`` (see
      :meth:`stream`); a call's ``spec_sampling=`` overrides it.

    Raises :class:`MTPUnsupportedError` when the model has no MTP layers or was
    loaded with ``load_mtp=False``, ``ValueError`` for bad options.

    The loop (one *iteration* = one verification decode of the target):

    1. the prompt minus its last token is processed (target + MTP head);
    2. ``k = min(n_draft, max_tokens - emitted - 1, n_ctx - n_past - 1)``
       tokens are drafted by the MTP head (``p_min`` may stop it earlier; no
       draft when ``k <= 0``);
    3. ``[last, drafts...]`` is verified in one target decode;
    4. the longest prefix of drafts the sampler agrees with is accepted, plus
       the sampler's own next token, and they are emitted in order, so
       ``max_tokens`` is never exceeded.  The recurrent state of hybrid models
       (Qwen3.5/3.6 Gated-DeltaNet layers) is rolled back with llama.cpp's
       per-sequence snapshots (``n_rs_seq`` = the longest draft), as upstream does.

    When the target samples an end-of-generation token inside a verified batch,
    generation ends there: acceptance stops at that token (as upstream's
    ``common_sampler_sample_and_accept_n`` does), so ``drafts_accepted`` counts
    only the drafts confirmed *before* it (a draft that itself equals the
    end-of-generation token is not counted), the drafts after it are neither
    accepted nor emitted, ``iters`` counts the iteration, and ``tokens_emitted``
    counts the tokens delivered before it (the end-of-generation token is never
    emitted).
    """
    def __init__(self, Model model not None, *, n_draft=3, p_min=0.0, n_draft_max=None, spec_sampling=None,
                 **options):
        self._spec_default = _spec_rule(spec_sampling)
        o = self._begin_init(model, options, "MTP")
        if isinstance(n_draft, str):
            if n_draft != "auto":
                raise ValueError(f"n_draft must be an int in [1, {_MAX_N_DRAFT}] or 'auto', got {n_draft!r}")
            self.auto = True
            self.k_max = _AUTO_MAX_DEFAULT if n_draft_max is None else \
                _as_int("n_draft_max", n_draft_max, 1, _AUTO_MAX)
        else:
            if isinstance(n_draft, bool) or not isinstance(n_draft, int):
                raise ValueError(f"n_draft must be an int in [1, {_MAX_N_DRAFT}] or 'auto', got {n_draft!r}")
            if not 1 <= n_draft <= _MAX_N_DRAFT:
                raise ValueError(f"n_draft must be an int in [1, {_MAX_N_DRAFT}] or 'auto', got {n_draft!r}")
            if n_draft_max is not None:
                raise ValueError("n_draft_max only applies to n_draft='auto'")
            self.auto = False
            self.k_max = n_draft
        self._n_draft = n_draft
        self._p_min = _as_float("p_min", p_min, 0.0, 1.0)
        if model.n_layer_nextn <= 0 and not model._has_sidecar():
            raise MTPUnsupportedError(
                f"{model.path!r} has no MTP (NextN) layers (architecture {model.arch!r}, "
                f"nextn_predict_layers = 0): MTP speculative decoding needs a GGUF that ships the MTP "
                f"head, e.g. an '*-MTP-GGUF' conversion of Qwen3.5/3.6, or an MTP sidecar "
                f"(Model(path, mtp_head='mtp-....gguf')); use mtp_cy.Session for plain decoding")
        if not model.has_mtp:
            raise MTPUnsupportedError(
                f"{model.path!r} was loaded with load_mtp=False, so its MTP layers are not in memory; "
                f"load it with mtp_cy.Model(path) (load_mtp=None or True)")
        if model.n_layer_nextn > 1:
            raise MTPUnsupportedError(
                f"{model.path!r} ({model.arch!r}) has {model.n_layer_nextn} chained MTP heads (one per draft "
                f"position, step35-style); mtp_cy drives a single MTP head (the Qwen3.5/3.6 layout) and would "
                f"draft with the first one only: use upstream's llama-server / llama-speculative-simple for "
                f"this model, or mtp_cy.Session for plain decoding")
        cdef llama_context_params cp = _context_params(o)
        # A verification batch is [last, drafts...] and, on hybrid/recurrent models, its
        # trailing k + 1 tokens must stay in one ubatch (llama.cpp asserts otherwise):
        # the effective ubatch (llama.cpp clamps it to n_batch) must exceed k + 1.
        if <int>cp.n_ubatch < self.k_max + 2:
            limit = "n_ubatch" if o["n_ubatch"] is not None else ("n_batch" if o["n_batch"] is not None
                                                                  else "n_ctx")
            raise ValueError(
                f"MTP with n_draft={self.k_max} verifies {self.k_max + 1} tokens at once and needs "
                f"n_ubatch >= n_draft + 2 = {self.k_max + 2}, but n_ubatch is {cp.n_ubatch} (from {limit}="
                f"{o[limit]}): raise {limit}, or lower n_draft")
        self.k_default = -1 if self.auto else self.k_max
        self._open_loop(model, o, cp, 1, o["n_ctx"], MTPUnsupportedError)
        self._plug_policy(LAG_WINDOW)

    @property
    def p_min(self):
        """A draft ends at the first token whose head probability is below this."""
        return self._p_min

    @property
    def n_draft(self):
        """The configured draft length: an int, or ``"auto"``."""
        return self._n_draft

    @property
    def n_draft_max(self):
        """The longest draft this session may make (``n_draft``, or the bound of ``"auto"``)."""
        return self.k_max

    def __repr__(self):
        return (f"<mtp_cy.MTP n_draft={self._n_draft!r} n_ctx={self.n_ctx}"
                f"{' closed' if self.closed else ''}>")

    cdef int _n_pos(self):
        return min(self.k_max, 64)

    cdef bint _drafts(self):
        return True

    cdef void _more_stats(self, dict d) except *:
        cdef int k
        cdef double cf = 0, cp = 0
        cdef int nb = self.policy.NB      # buckets of the confidence calibration
        cdef int kk = self.policy.best if self.policy.best > 0 else self.k_max
        d["n_draft"] = self._n_draft
        d["p_min"] = self._p_min
        if not self.auto:
            return
        pol = self.policy
        self.policy.catch_up_fit(cf, cp)
        d["policy"] = {
            "chosen": {k: self.policy.chosen[k] for k in range(self.k_max + 1)},
            "current": self.policy.best,
            "iterations": self.policy.iter,
            # the sampler the acceptance below was learned under (a call with other settings
            # starts it afresh)
            "learned_under": None if self._acc_key is None else
                {"spec_sampling": self._acc_key[0], "temp": round(self._acc_key[1], 6)},
            # draft tokens observed at each position (decayed counts) since then
            "observed_by_position": {k: round(self.policy.pos_tot[k], 2) for k in range(1, self.k_max + 1)},
            "plain_step_us": round(self.policy.plain_cost(), 1),
            "verify_us": {k + 1: round(self.policy.verify_cost(k + 1), 1) for k in range(self.k_max + 1)},
            "draft_token_us": round(self.policy.d_us, 1),
            "catch_up_us": {"fixed": round(cf, 1), "per_token": round(cp, 1)},
            "sample_us": round(self.policy.s_us, 1),
            # under the cut in force, in a draft of the current length (k_max if plain)
            "acceptance_by_position": {k: round(self.policy.accept(k, kk), 4) for k in range(1, self.k_max + 1)},
            "expected_tokens_per_sec": {k: round(self.policy.score(k) * 1e6, 1) for k in range(self.k_max + 1)},
            # the learned draft-confidence cut (a p_min that prices itself): a draft token
            # whose calibrated acceptance is below the break-even one ends the draft
            "confidence_cut": {
                "active": bool(self.policy.cut_active),
                "p_min": round(self.policy.cut_below(False), 3),
                "p_min_last": round(self.policy.cut_below(True), 3),
                "break_even": round(self.policy.tau_mid, 4),
                "pass_by_position": {k: round(self.policy.pass_(k, kk), 4) for k in range(1, self.k_max + 1)},
                "calibration": {round(b / <double>nb, 2): round(self.policy.calibrated((b + 0.5) / nb), 3)
                                for b in range(nb)},
            },
        }

    def reset_policy(self):
        """Forget what ``n_draft="auto"`` learned (costs and acceptance); it measures again."""
        self._check()
        self.policy.configure(self.k_max)

    def print_stats(self):
        """Write a summary of the speculative statistics in the format of upstream's
        ``common_speculative_print_stats`` to the ``"mtp_cy"`` logger at INFO level,
        and return it as a str (the process's file descriptors are not touched)."""
        st = self._stats()
        iters = st["iters"]
        gen, acc = st["drafts_generated"], st["drafts_accepted"]
        mean = 1.0 + acc / iters if iters else 0.0
        line = (f"statistics {'draft-mtp':>16}: #calls(b,g,a) = {st['calls']:4d} {iters:6d} {iters:6d}, "
                f"#gen tokens = {gen:6d}, #acc tokens = {acc:5d}, #mean acc len = {mean:.2f}, "
                f"acceptance = {100.0 * st['acceptance_rate']:.3f}%, dur(draft,verify,sample) = "
                f"{st['timing_us']['draft'] / 1000.0:.3f}, {st['timing_us']['verify'] / 1000.0:.3f}, "
                f"{st['timing_us']['sample'] / 1000.0:.3f} ms" + _by_pos_text(st))
        logger.info("%s", line)
        return line + "\n"


cdef class DraftPolicy:
    """The draft-length policy of ``MTP(n_draft="auto")`` on its own (see ``mtp_cy/_policy.h``).

    The MTP loop calls :meth:`choose` before each iteration and :meth:`observe` after
    it; this class exposes the same unit so that it can be studied and tested with
    synthetic cost/acceptance traces, without a model::

        p = DraftPolicy(k_max=4)
        k = p.choose()
        p.observe(k, n_accepted, verify_us=..., draft_us=..., draft_steps=k,
                  catch_up_us=..., catch_up_tokens=..., sample_us=...)

    Times are microseconds.  Options (the defaults are the MTP loop's): ``p_min``; the
    gaps between probes of drafting while plain decoding wins (``min_gap``, ``max_gap``);
    ``explore_every`` (iterations between re-measurements of another length);
    ``refine_iters`` (how long a close call is measured, 0: not at all); ``plain_run``
    (the plain steps in a row that measure plain decoding when it is close to the best).
    """
    cdef mtp_cy_policy * p

    def __cinit__(self, *args, **kwargs):
        self.p = new mtp_cy_policy()

    def __dealloc__(self):
        del self.p

    def __init__(self, k_max=4, *, p_min=0.0, min_gap=None, max_gap=None, explore_every=None, refine_iters=None,
                 plain_run=None):
        self.p.configure(_as_int("k_max", k_max, 1, _AUTO_MAX))
        self.p.p_min = _as_float("p_min", p_min, 0.0, 1.0)
        if refine_iters is not None:
            self.p.refine_iters = _as_int("refine_iters", refine_iters, 0)
        if min_gap is not None:
            self.p.min_gap = _as_int("min_gap", min_gap, 1)
            self.p.gap = self.p.min_gap
        if max_gap is not None:
            self.p.max_gap = _as_int("max_gap", max_gap, 1)
        if explore_every is not None:
            self.p.explore_every = _as_int("explore_every", explore_every, 1)
        if plain_run is not None:
            self.p.plain_run = _as_int("plain_run", plain_run, 2)

    @property
    def k_max(self):
        """The longest draft the policy may choose."""
        return self.p.k_max

    @property
    def p_min(self):
        """The fixed confidence floor the drafter applies besides the learned cut."""
        return self.p.p_min

    @property
    def drafting_iterations(self):
        """Iterations that drafted (measuring passes, probes and drafting choices)."""
        return self.p.n_drafting

    def choose(self):
        """The draft length for the next iteration (0 = a plain step)."""
        return self.p.choose()

    def observe(self, int k, int n_accepted, *, double verify_us, double draft_us=0.0, int draft_steps=0,
                double catch_up_us=0.0, int catch_up_tokens=0, double sample_us=0.0, k_chosen=None):
        """Feed what one iteration measured: ``k`` tokens drafted (and verified with the
        last one: ``k + 1`` target tokens in ``verify_us``), ``n_accepted`` of them
        accepted, ``draft_steps`` MTP-head decodes in ``draft_us``, a catch-up of
        ``catch_up_tokens`` in ``catch_up_us``, sampling in ``sample_us``.  ``k_chosen``:
        the length asked for, when a confidence cut (or ``p_min``) drafted fewer (``k``)."""
        if k < 0 or k > self.p.KMAX or n_accepted < 0 or n_accepted > k:
            raise ValueError(f"need 0 <= n_accepted <= k <= {self.p.KMAX}, got k={k}, n_accepted={n_accepted}")
        cdef int kc = -1
        if k_chosen is not None:
            kc = _as_int("k_chosen", k_chosen, k, self.p.KMAX)
        self.p.observe(k, n_accepted, verify_us, draft_us, draft_steps, catch_up_us, catch_up_tokens, sample_us, kc)

    def observe_confidence(self, double p, bint accepted, position=None):
        """Feed the calibration of the draft's confidence: a draft token of probability
        ``p`` was (or, left out by the cut, would have been) ``accepted`` or not.
        ``position``: its place in the draft (1-based; the tokens before it were
        accepted), from which the policy learns how often a cut lets each position pass."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        cdef int pos = 0 if position is None else _as_int("position", position, 1, self.p.KMAX)
        self.p.observe_confidence(p, accepted, pos)

    def calibrated(self, double p):
        """The estimated probability that a draft token of probability ``p`` is accepted."""
        return self.p.calibrated(p)

    def keeps(self, double p, bint last=False):
        """Whether the cut in force drafts a token of probability ``p`` (``last``: the
        draft's last token, which does not pay for drafting another)."""
        return self.p.keeps(p, last)

    @property
    def cut_active(self):
        """Whether the learned confidence cut is in force (from the second measuring pass
        on; on plain steps too, where it prices the draft lengths)."""
        return self.p.cut_active

    @property
    def cut_below(self):
        """The cut in force as a ``p_min``: a draft token below it ends the draft."""
        return self.p.cut_below(False)

    @property
    def break_even(self):
        """The acceptance a draft token needs to pay for itself at the current rate."""
        return self.p.tau_mid

    def pass_rate(self, int position, k=None):
        """Estimated probability that draft ``position`` survives the cut in force (and
        ``p_min``) when the ones before it did, in a draft of ``k`` tokens (default
        ``k_max``; the last token of a draft has a lower bar)."""
        cdef int kk = self.p.k_max if k is None else _as_int("k", k, 1, self.p.KMAX)
        return self.p.pass_(position, kk)

    def reset(self):
        """Forget everything learned."""
        self.p.configure(self.p.k_max)

    def expected_tokens(self, int k):
        """Expected tokens per iteration when drafting ``k`` (from the acceptance estimates)."""
        return self.p.expected_tokens(k)

    def cost_us(self, int k):
        """Estimated microseconds of an iteration drafting ``k``."""
        return self.p.cost(k)

    def tokens_per_second(self, int k):
        """Estimated throughput of drafting ``k`` every iteration."""
        return self.p.score(k) * 1e6

    def acceptance(self, int position, k=None):
        """Estimated probability that draft ``position`` (1-based) is drafted (it passes the
        cut in force) and accepted when the ones before it were, in a draft of ``k`` tokens
        (default ``k_max``)."""
        cdef int kk = self.p.k_max if k is None else _as_int("k", k, 1, self.p.KMAX)
        return self.p.accept(position, kk)

    @property
    def best(self):
        """The length with the best estimated throughput at the last decision (-1 before any)."""
        return self.p.best

    @property
    def chosen(self):
        """How often each length was chosen: ``{k: count}``."""
        return {k: self.p.chosen[k] for k in range(self.p.k_max + 1)}

    @property
    def iterations(self):
        """Decisions made so far."""
        return self.p.iter
