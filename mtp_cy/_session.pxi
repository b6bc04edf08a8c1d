# Session: plain (non-speculative) decoding of one sequence, the baseline of every MTP result:
# the generation loop (_loop.h) with one sequence and no drafter.

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
        self.k_max = 0
        self.k_default = 0
        self._n_draft = 0
        self._open_loop(model, o, cp, 1, o["n_ctx"], MTPError)

    def __repr__(self):
        return f"<mtp_cy.Session n_ctx={self.n_ctx}{' closed' if self.closed else ''}>"
