# The token stream: a plain Python iterator over one generation call of a
# Session or MTP.  Its __next__ hands out what the last native step produced
# and asks the engine for one more step when it runs out (see _engine.pxi);
# stop strings, UTF-8 reassembly and the terminal events live here.

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



_OPENAI_FINISH = (None, "length", "stop", "length", "cancelled", "error", "stop")
_STOP_REASONS = (None, "max_tokens", "eog", "ctx_full", "cancelled", "error", "stop_string")


@cython.no_gc_clear
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
    cdef Model model              # retained while the stream lives (its sampler uses the vocabulary)
    cdef vector[llama_token] prompt
    cdef common_params_sampling sp
    cdef common_sampler * smpl
    cdef mtp_cy_spec * spec       # spec_sampling="rejection" on an engine that drafts (owned; Batch: its slot's)
    cdef str spec_rule            # the rule in force: "rejection" or "match" (greedy calls: "match")
    cdef const llama_vocab * vocab
    cdef vector[llama_token] pending
    cdef size_t pending_pos
    cdef bint events
    cdef bint started
    cdef bint executing           # __next__ is running (one stream, two threads: refused)
    cdef bint finished
    cdef bint owns_busy
    cdef int reason
    cdef int max_tokens
    cdef int emitted              # tokens generated (and taken off `pending`), EOG excluded
    cdef int delivered            # tokens delivered to the caller (see the class docstring)
    cdef int emit_stats_every
    cdef int64_t timeout_us
    cdef int64_t prompt_timeout_us
    cdef int ckpt_hint            # chat(): a position worth a state checkpoint (0: none)
    # this call's results
    cdef list out_tokens          # delivered token ids
    cdef list out_text            # delivered text, in pieces
    cdef list out_logprobs        # per delivered token (logprobs requested)
    cdef dict stats0              # the engine's counters when the stream opened
    cdef dict stats_end           # this call's statistics, frozen when the stream ended
    cdef int n_cached             # prompt tokens whose state was reused
    cdef object chat_parser       # chat(): the ChatParser of the rendered conversation
    cdef object _completion
    # log-probabilities (n_top < 0: not requested) of the pending tokens
    cdef int n_top
    cdef vector[float] lp_vals
    cdef vector[llama_token] lp_top_ids
    cdef vector[float] lp_top_vals
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
    cdef list held                # (token, start, release_at, piece_end, logprob) of the undelivered
                                  # tokens: text offsets of its piece (start..piece_end); it is delivered
                                  # once the text is released up to release_at (piece_end, + 1 while its
                                  # bytes only start a character); logprob: its dict or None
    cdef str hit                  # the stop string that ended the stream
    # native loop state (used by the engines)
    cdef llama_token last         # the next token to decode (sampled, or the prompt's last)
    cdef vector[llama_token] draft
    # mtp_cy.Batch: the slot of this call, and this call's own counters (the steps it took part in)
    cdef int slot
    cdef uint64_t call_id
    cdef int k_req                # a per-call n_draft (-1: the engine's)
    cdef bint cancel_req
    cdef int64_t b_iters, b_gen, b_acc, b_t_draft, b_t_verify, b_t_sample, b_t_total, b_t_prefill
    cdef list b_gen_pos, b_acc_pos   # mtp_cy.Batch: this call's drafts by position

    def __cinit__(self):
        self.smpl = NULL
        self.spec = NULL
        self.spec_rule = "match"
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
        self.executing = False
        self.out_tokens = []
        self.out_text = []
        self.out_logprobs = None
        self.n_top = -1
        self._completion = None
        self.slot = -1
        self.call_id = 0
        self.k_req = -1
        self.cancel_req = False
        self.b_iters = self.b_gen = self.b_acc = 0
        self.b_t_draft = self.b_t_verify = self.b_t_sample = self.b_t_total = self.b_t_prefill = 0

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        if self.spec != NULL:
            del self.spec
            self.spec = NULL
        if self.smpl != NULL:
            common_sampler_free(self.smpl)
            self.smpl = NULL
        if self.owns_busy and self.engine is not None:
            self.engine._finish(self)
            if not self.engine._multi:
                self.engine.busy.release()
            self.owns_busy = False
        if self.model is not None:
            self.model._release()
            self.model = None

    cdef void _end(self, int reason):
        # freeze this call's statistics now: a later call on the same session must not
        # leak into the (lazily built) completion of this one
        if self.stats_end is None and self.stats0 is not None:
            self.stats_end = self._call_stats()
        self.finished = True
        self.reason = reason
        self._release()

    def __iter__(self):
        return self

    def close(self):
        """Stop the stream; when it returns the native loop has stopped and the session is free.

        Raises ``ValueError`` when called while another thread is inside this
        stream's ``__next__`` (as a running generator's ``close()`` does)."""
        if self.executing:
            raise ValueError("generator already executing")
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
            self.engine._cancel_call(self)

    @property
    def finish_reason(self):
        """Why the stream ended, in OpenAI's vocabulary: ``None`` while it runs, then
        ``"stop"`` (the model ended the text, or a stop string), ``"length"``
        (``max_tokens``, or the context is full), ``"cancelled"`` or ``"error"``.
        :attr:`stop_reason` has the detail."""
        return _OPENAI_FINISH[self.reason]

    @property
    def stop_reason(self):
        """The detail of :attr:`finish_reason`: ``None`` while running, then ``"eog"``,
        ``"stop_string"``, ``"max_tokens"``, ``"ctx_full"``, ``"cancelled"`` or ``"error"``
        (the same words as ``stats["stop_reason"]`` of the ``("done", stats)`` event)."""
        return _STOP_REASONS[self.reason]

    @property
    def stop_string(self):
        """The stop string that ended the stream, or ``None``."""
        return self.hit

    @property
    def completion(self):
        """This call's :class:`mtp_cy.Completion` (text, token ids, reasons, usage,
        statistics, log-probabilities) once the stream has ended; ``None`` before."""
        if self.reason == R_NONE:
            return None
        if self._completion is None:
            from mtp_cy.completion import Completion
            self._completion = Completion._from_stream(self)
        return self._completion

    @property
    def chat_parser(self):
        """For :meth:`Session.chat` streams: the :class:`ChatParser` that turns the reply
        into content, reasoning and tool calls; ``None`` otherwise."""
        return self.chat_parser

    def _result(self):
        """The raw material of :attr:`completion` (a dict)."""
        return {"text": "".join(self.out_text), "tokens": list(self.out_tokens),
                "finish_reason": _OPENAI_FINISH[self.reason], "stop_reason": _STOP_REASONS[self.reason],
                "stop_string": self.hit, "prompt_tokens": <int>self.prompt.size(), "cached_tokens": self.n_cached,
                "stats": self._call_stats(), "logprobs": self.out_logprobs,
                "chat_parser": self.chat_parser}

    cdef dict _call_stats(self):
        """This call's statistics: the engine's counters since the stream opened (until it ended)."""
        if self.stats_end is not None:
            d = dict(self.stats_end)
            d["timing_us"] = dict(d["timing_us"])
            return d
        if self.engine._multi:
            return self.engine._stream_stats(self)
        now = self.engine._stats()
        d = {}
        for k in ("iters", "drafts_generated", "drafts_accepted", "tokens_emitted", "calls"):
            d[k] = now[k] - self.stats0[k]
        d["acceptance_rate"] = (d["drafts_accepted"] / d["drafts_generated"]) if d["drafts_generated"] else 0.0
        for k in ("drafts_generated_by_pos", "drafts_accepted_by_pos"):
            d[k] = [a - b for a, b in zip(now[k], self.stats0[k])]
        t = {k: now["timing_us"][k] - self.stats0["timing_us"][k] for k in now["timing_us"]}
        d["timing_us"] = t
        d["tokens_per_sec"] = (d["tokens_emitted"] * 1e6 / t["total"]) if t["total"] > 0 else 0.0
        d["prompt_tokens"] = <int>self.prompt.size()
        d["prompt_tokens_cached"] = self.n_cached
        self.engine._more_stats(d)
        d.pop("policy", None)
        if self.k_req >= 0:
            d["n_draft"] = self.k_req       # this call's own draft length
        d["spec_sampling"] = self.spec_rule
        return d

    @property
    def tokens_delivered(self):
        """Tokens delivered so far by this stream (see the class docstring)."""
        return self.delivered

    # -- delivery ---------------------------------------------------------------------
    cdef void _deliver(self, llama_token tok, piece, bint with_text, lp=None) except *:
        self.delivered += 1
        mtp_cy_add(self.engine.st.tokens_emitted, 1)
        self.out_tokens.append(tok)
        if self.out_logprobs is not None:
            self.out_logprobs.append(lp)
        if self.events:
            self.out_text.append(piece)
            if self.n_top >= 0:
                self.queue.append(("token", tok, piece, lp))
            else:
                self.queue.append(("token", tok, piece))
            if self.emit_stats_every > 0 and self.delivered % self.emit_stats_every == 0:
                self.queue.append(("stats", self.engine._stats()))
        elif with_text and piece:
            self._text_out(piece)

    cdef void _text_out(self, str piece) except *:
        self.out_text.append(piece)
        self.queue.append(piece)

    cdef void _release_to(self, Py_ssize_t upto) except *:
        """Release the text up to character ``upto`` and deliver the tokens it completes."""
        cdef Py_ssize_t nb
        cdef tuple h
        if not self.events and upto > self.released:
            self._text_out(self.text[self.released - self.base:upto - self.base])
        if upto > self.released:
            self.released = upto
        while self.held:
            h = <tuple>self.held[0]
            if <Py_ssize_t>h[2] > self.released:
                break
            del self.held[0]
            self._deliver(h[0], self.text[<Py_ssize_t>h[1] - self.base:<Py_ssize_t>h[3] - self.base]
                          if self.events else None, False, h[4])
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
                self._text_out(self.text[rel:best])
            self.released = p
            for h in self.held:
                if <Py_ssize_t>h[1] < p:     # its text starts before the stop string
                    self._deliver(h[0], self.text[<Py_ssize_t>h[1] - self.base:
                                                  min(<Py_ssize_t>h[3], p) - self.base]
                                  if self.events else None, False, h[4])
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
                          if self.events else None, False, h[4])
        self.held = []

    cdef object _logprob(self, size_t i):
        """The log-probability record of pending token ``i``."""
        cdef size_t j, n = <size_t>self.n_top
        if self.n_top < 0 or i >= self.lp_vals.size():
            return None
        return {"logprob": self.lp_vals[i],
                "top_logprobs": [(self.lp_top_ids[i * n + j], self.lp_top_vals[i * n + j]) for j in range(n)]}

    cdef int _take(self, llama_token tok, size_t i) except -1:
        """Process generated token ``tok`` (pending index ``i``): end of generation, text,
        stop strings, max_tokens."""
        cdef Py_ssize_t start
        if llama_vocab_is_eog(self.vocab, tok):
            self._finish_event(R_EOG)
            return 0
        b = self.model._piece(tok)
        lp = self._logprob(i)
        if lp is not None:
            lp["text"] = b.decode("utf-8", "replace")
        self.emitted += 1
        if self.stops is None:
            self._deliver(tok, self.decoder.decode(b), True, lp)
        else:
            start = self.total
            piece = self.decoder.decode(b)
            self.total += len(piece)
            self.text += piece
            # a token whose bytes start a character belongs to that character
            self.held.append((tok, start, self.total + (1 if self.decoder.getstate()[0] else 0), self.total, lp))
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
                fs = self._call_stats()
                fs["stop_reason"] = _STOP_REASONS[reason]
                self.queue.append(("done", fs))
        # bytes of a character left incomplete when generation stopped are dropped (in
        # both modes), never yielded as a broken half or a replacement character

    cdef int _native_step(self) except -1:
        """Run one native step (prefill + first step, or one decode / draft-verify iteration)."""
        cdef _Engine eng = self.engine
        cdef int r
        self.pending.clear()
        self.pending_pos = 0
        self.lp_vals.clear()
        self.lp_top_ids.clear()
        self.lp_top_vals.clear()
        try:
            r = eng._native(self)
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

    cdef int _closed_check(self) except -1:
        """The session was closed under this unfinished stream: end it with ClosedError."""
        if not self.finished and (self.engine._closed or self.engine._close_pending):
            self._end(R_CANCEL)
            self.queue = []
            self.deferred = None
            raise ClosedError(f"the {type(self.engine).__name__} was closed during the stream")
        return 0

    def __next__(self):
        if self.executing:
            raise ValueError("generator already executing")
        self.executing = True
        try:
            return self._next()
        finally:
            self.executing = False

    cdef object _next(self):
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
            self._closed_check()
            if self.pending_pos < self.pending.size():
                tok = self.pending[self.pending_pos]
                self.pending_pos += 1
                self._take(tok, self.pending_pos - 1)
                continue
            # need more tokens: run one native step
            self._native_step()

    def _pull(self):
        """For the asyncio wrappers (run in a worker thread): return the next items, at
        most one native step's worth -- every item available without another native
        step; an empty list once the stream is over."""
        cdef llama_token tok
        if self.executing:
            raise ValueError("generator already executing")
        self.executing = True
        try:
            try:
                out = [self._next()]
            except StopIteration:
                return []
            while True:
                if self.queue:
                    out.append(self.queue.pop(0))
                elif self.deferred is not None or self.finished:
                    break
                elif self.pending_pos < self.pending.size():
                    if self.engine._closed or self.engine._close_pending:
                        break
                    tok = self.pending[self.pending_pos]
                    self.pending_pos += 1
                    self._take(tok, self.pending_pos - 1)
                else:
                    break
            return out
        finally:
            self.executing = False


cdef inline void _add_by_pos(_Stream s, int n_gen, int n_acc) except *:
    """mtp_cy.Batch: count one verification of the call of ``s`` by draft position."""
    cdef int i
    if n_gen <= 0:
        return
    if s.b_gen_pos is None:
        s.b_gen_pos = []
        s.b_acc_pos = []
    while len(s.b_gen_pos) < n_gen:
        s.b_gen_pos.append(0)
        s.b_acc_pos.append(0)
    for i in range(n_gen):
        s.b_gen_pos[i] += 1
        if i < n_acc:
            s.b_acc_pos[i] += 1


def _by_pos_text(st):
    """A second line for print_stats() after upstream's one (whose format it keeps):
    ``statistics        draft-mtp: acceptance by position = 0.950 0.800 ...`` (the positions
    drafted so far; empty when nothing was drafted)."""
    gen, acc = st.get("drafts_generated_by_pos") or [], st.get("drafts_accepted_by_pos") or []
    parts = [f"{a / g:.3f}" for g, a in zip(gen, acc) if g]
    return (f"\nstatistics {'draft-mtp':>16}: acceptance by position = " + " ".join(parts)) if parts else ""
