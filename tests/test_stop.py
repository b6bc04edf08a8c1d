"""Stop strings on Session and MTP: output, held-back release, events and exact statistics.

Expectations come from the synthetic oracle (``greedy`` / ``predict``: the
tokens, their text and, for MTP, every iteration's work) and from a small
reference implementation of the stop-string rules written independently of
the engine's (brute force over the whole text after each token).
"""
import pytest

import mtp_cy
from conftest import make_engine, prompt_of

COUNTERS = ("iters", "drafts_generated", "drafts_accepted", "tokens_emitted")
N_DRAFT = 3
N_CTX = 512


# ----------------------------------------------------------------- the reference rules

def _first_hit(text, stops):
    found = [(text.find(s), len(s), s) for s in stops if s in text]
    return min(found) if found else None


def _released(text, released, stops):
    """Smallest position q >= released such that text[q:] may still grow into a stop string."""
    for q in range(released, len(text)):
        tail = text[q:]
        if any(len(tail) < len(s) and s.startswith(tail) for s in stops):
            return q
    return len(text)


def reference(pieces, ids, stops):
    """What a stream with ``stop=stops`` yields for tokens ``ids`` with texts ``pieces``.

    Returns dict(text, chunks (stream() pieces), events (token events + terminal),
    delivered (token count), hit, last (index of the last generated token)).
    """
    text, released, starts, chunks, events, n_done = "", 0, [], [], [], 0
    for j, pc in enumerate(pieces):
        starts.append(len(text))
        text += pc
        hit = _first_hit(text, stops)
        if hit is not None:
            p, _, s = hit
            if p > released:
                chunks.append(text[released:p])
            for k in range(n_done, j + 1):
                if starts[k] < p:
                    end = min(starts[k] + len(pieces[k]), p)
                    events.append(("token", ids[k], text[starts[k]:end]))
            events.append(("stop", s))
            return dict(text=text[:p], chunks=chunks, events=events,
                        delivered=len(events) - 1, hit=s, last=j)
        q = _released(text, released, stops)
        if q > released:
            chunks.append(text[released:q])
            released = q
        while n_done <= j and starts[n_done] + len(pieces[n_done]) <= released:
            events.append(("token", ids[n_done], pieces[n_done]))
            n_done += 1
    if released < len(text):
        chunks.append(text[released:])
    for k in range(n_done, len(pieces)):
        events.append(("token", ids[k], pieces[k]))
    return dict(text=text, chunks=chunks, events=events, delivered=len(pieces), hit=None,
                last=len(pieces) - 1)


def expected_counters(kind, pred, last, delivered):
    """Native work done until the token ``last`` was generated, and the delivered count."""
    if kind == "session":
        # one decode per token (the first one decodes the prompt's last token)
        return {"iters": last + 1, "drafts_generated": 0, "drafts_accepted": 0, "tokens_emitted": delivered}
    it = gen = acc = produced = 0
    for d, a, n in pred.steps:
        it, gen, acc, produced = it + 1, gen + d, acc + a, produced + n
        if produced > last:
            break
    return {"iters": it, "drafts_generated": gen, "drafts_accepted": acc, "tokens_emitted": delivered}


def counters(engine):
    st = engine.stats()
    return {k: st[k] for k in COUNTERS}


# ----------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=["session", "mtp"])
def engine(request, mtp_model):
    e = make_engine(request.param, mtp_model, n_draft=N_DRAFT, n_ctx=N_CTX, n_threads=1)
    yield request.param, e
    e.close()


def oracle(sm, p, max_tokens):
    pred = sm.predict(p, max_tokens, N_DRAFT, n_ctx=N_CTX)
    assert pred.tokens == sm.greedy(p, max_tokens).tokens
    return pred


def check(kind, e, sm, p, max_tokens, stops):
    pred = oracle(sm, p, max_tokens)
    pieces = [sm.pieces[t] for t in pred.tokens]
    ref = reference(pieces, pred.tokens, stops)
    arg = stops[0] if len(stops) == 1 else list(stops)

    e.reset_stats()
    assert e.generate(p, max_tokens=max_tokens, temp=0, stop=arg) == ref["text"]
    assert counters(e) == expected_counters(kind, pred, ref["last"], ref["delivered"])

    e.reset_stats()
    it = e.stream(p, max_tokens=max_tokens, temp=0, stop=arg)
    assert list(it) == ref["chunks"]
    assert it.stop_reason == ("stop_string" if ref["hit"] else "max_tokens")
    assert it.finish_reason == ("stop" if ref["hit"] else "length")
    assert it.stop_string == ref["hit"]
    assert counters(e) == expected_counters(kind, pred, ref["last"], ref["delivered"])

    e.reset_stats()
    events = list(e.stream_events(p, max_tokens=max_tokens, temp=0, stop=arg))
    if ref["hit"] is None:
        assert events[:-1] == ref["events"]
        assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "max_tokens"
        assert events[-1][1]["tokens_emitted"] == max_tokens
    else:
        assert events == ref["events"]
    assert counters(e) == expected_counters(kind, pred, ref["last"], ref["delivered"])
    return ref


# ----------------------------------------------------------------- tests

def test_stop_strings_at_every_position(engine, mtp_sm):
    """Stop strings inside a token, across two or three tokens, on token boundaries,
    at the very start: text, stream chunks, events and exact statistics."""
    kind, e = engine
    p = prompt_of(mtp_sm, 3)
    M = 24
    text = oracle(mtp_sm, p, M).text
    pieces = [mtp_sm.pieces[t] for t in oracle(mtp_sm, p, M).tokens]
    bounds = [0]
    for pc in pieces:
        bounds.append(bounds[-1] + len(pc))
    cases = set()
    for k in (0, 1, 4, 9, 17, 23):
        b = bounds[k]
        cases.add(text[b:b + 3])                 # starts on a token boundary, inside one token
        cases.add(text[b + 2:b + 4])             # strictly inside a token
        cases.add(text[b + 2:bounds[k + 1] + 2] if k + 1 < M else text[b + 1:])  # across a boundary
        if k + 3 <= M:
            cases.add(text[b + 1:bounds[k + 3] - 1])  # across three tokens
    cases.add(text[:1])                          # the very first character: nothing is returned
    seen_hits = 0
    for stop in sorted(c for c in cases if c):
        ref = check(kind, e, mtp_sm, p, M, [stop])
        assert ref["hit"] == stop
        seen_hits += 1
    assert seen_hits >= 15


def test_first_character_stop_returns_nothing(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 2, 5)
    text = oracle(mtp_sm, p, 10).text
    e.reset_stats()
    events = list(e.stream_events(p, max_tokens=10, temp=0, stop=text[:2]))
    assert events == [("stop", text[:2])]
    assert e.stats()["tokens_emitted"] == 0
    assert e.generate(p, max_tokens=10, temp=0, stop=[text[:2]]) == ""


def test_several_stop_strings_earliest_wins(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 2)
    text = oracle(mtp_sm, p, 20).text
    late, early = text[40:46], text[21:25]
    assert text.find(early) < text.find(late)
    ref = check(kind, e, mtp_sm, p, 20, [late, early])
    assert ref["hit"] == early and ref["text"] == text[:text.find(early)]
    # both at the same position: the shorter one is complete first
    ref = check(kind, e, mtp_sm, p, 20, [text[30:37], text[30:33]])
    assert ref["hit"] == text[30:33]
    # duplicates and never-matching strings change nothing
    ref = check(kind, e, mtp_sm, p, 20, [early, "zzz-not-there", early])
    assert ref["hit"] == early


def test_held_back_text_is_released_when_it_cannot_be_a_stop(engine, mtp_sm):
    """A stop string whose beginning appears but which never completes: the held text
    comes out as soon as the next character rules it out, and nothing is lost."""
    kind, e = engine
    p = prompt_of(mtp_sm, 3, 1)
    pred = oracle(mtp_sm, p, 16)
    w1, w2 = mtp_sm.pieces[pred.tokens[1]], mtp_sm.pieces[pred.tokens[2]]
    stop = w1[-1:] + w2[:2] + "#"            # last char of token 1 + first two of token 2, then never
    ref = check(kind, e, mtp_sm, p, 16, [stop])
    assert ref["hit"] is None and ref["text"] == pred.text
    # token 1's last character was held and released together with token 2's text
    assert ref["chunks"][1] == w1[:-1] and ref["chunks"][2].startswith(w1[-1:] + w2)


def test_text_held_at_the_end_is_flushed(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 2, 3)
    pred = oracle(mtp_sm, p, 12)
    stop = mtp_sm.pieces[pred.tokens[-1]] + "#"      # the last token stays a possible prefix
    e.reset_stats()
    events = list(e.stream_events(p, max_tokens=12, temp=0, stop=stop))
    assert [x[1] for x in events if x[0] == "token"] == pred.tokens
    assert events[-1][0] == "done" and events[-1][1]["stop_reason"] == "max_tokens"
    assert e.stats()["tokens_emitted"] == 12
    assert "".join(e.stream(p, max_tokens=12, temp=0, stop=stop)) == pred.text


def test_eog_flushes_held_text(synthetic):
    sm = synthetic.cached_model(eog_after="sea", seed=3, acceptance=1.0, mtp_head="own")
    inv = {v: k for k, v in sm.f.items()}
    t = sm.eog_after
    for _ in range(4):
        t = inv[t]
    p = [sm.token_ids[2], t]
    with mtp_cy.Model(sm.path) as model:
        for e in (mtp_cy.Session(model, n_ctx=128, n_threads=1), mtp_cy.MTP(model, n_draft=3, n_ctx=128, n_threads=1)):
            with e:
                want = sm.greedy(p, 40)
                assert want.stop == "eog"
                stop = sm.pieces[want.tokens[-1]] + "#"
                e.reset_stats()
                events = list(e.stream_events(p, max_tokens=40, temp=0, stop=stop))
                assert events[-1] == ("eog", None)
                assert [x[1] for x in events if x[0] == "token"] == want.tokens
                assert e.stats()["tokens_emitted"] == len(want.tokens)


def test_stats_events_count_delivered_tokens(engine, mtp_sm):
    kind, e = engine
    p = prompt_of(mtp_sm, 3)
    pred = oracle(mtp_sm, p, 30)
    text = pred.text
    stop = text[len(text) // 2:len(text) // 2 + 5]
    ref = reference([mtp_sm.pieces[t] for t in pred.tokens], pred.tokens, [stop])
    e.reset_stats()
    events = list(e.stream_events(p, max_tokens=30, temp=0, stop=stop, emit_stats_every=2))
    stats_ev = [x for x in events if x[0] == "stats"]
    assert len(stats_ev) == ref["delivered"] // 2
    assert [s[1]["tokens_emitted"] for s in stats_ev] == [2 * (i + 1) for i in range(len(stats_ev))]
    assert [x for x in events if x[0] != "stats"] == ref["events"]


def test_mtp_stop_inside_a_verified_batch_drops_the_rest(mtp_model, mtp_sm):
    """The stop string completes in the middle of an MTP iteration: the tokens after it in
    the same verified batch are generated but neither delivered nor counted."""
    with mtp_cy.MTP(mtp_model, n_draft=4, n_ctx=N_CTX, n_threads=1) as m:
        p = prompt_of(mtp_sm, 3)
        pred = mtp_sm.predict(p, 40, 4, n_ctx=N_CTX)
        # the first iteration that produced >= 3 tokens; stop on its middle token
        produced = 0
        for d, a, n in pred.steps:
            if n >= 3:
                break
            produced += n
        else:
            pytest.skip("no iteration produced 3 tokens")
        target = produced + 1
        pieces = [mtp_sm.pieces[t] for t in pred.tokens]
        start = sum(len(x) for x in pieces[:target])
        stop = pieces[target][1:]
        assert pred.text.find(stop) == start + 1
        m.reset_stats()
        events = list(m.stream_events(p, max_tokens=40, temp=0, stop=stop))
        toks = [x for x in events if x[0] == "token"]
        assert [x[1] for x in toks] == pred.tokens[:target + 1]
        assert toks[-1][2] == pieces[target][:1]
        st = m.stats()
        it = next(i for i in range(len(pred.steps)) if sum(s[2] for s in pred.steps[:i + 1]) > target) + 1
        assert st["iters"] == it
        assert st["tokens_emitted"] == target + 1
        assert st["drafts_accepted"] == sum(s[1] for s in pred.steps[:it])


def test_cancel_delivers_held_tokens(mtp_model, mtp_sm):
    """cancel() while a token is held back for a possible stop string: it is delivered
    before the ("done", cancelled) event (tokens already produced are kept)."""
    with mtp_cy.MTP(mtp_model, n_draft=4, n_ctx=N_CTX, n_threads=1) as m:
        for off in range(12):
            p = prompt_of(mtp_sm, 2, off)
            pred = mtp_sm.predict(p, 40, 4, n_ctx=N_CTX)
            if pred.steps[0][2] >= 2:
                break
        else:
            pytest.skip("no prompt whose first iteration produced 2 tokens")
        n1 = pred.steps[0][2]
        stop = mtp_sm.pieces[pred.tokens[n1 - 1]] + "#"   # the first iteration's last token is held
        m.reset_stats()
        it = m.stream_events(p, max_tokens=40, temp=0, stop=stop)
        first = next(it)
        assert first == ("token", pred.tokens[0], mtp_sm.pieces[pred.tokens[0]])
        m.cancel()
        rest = list(it)
        assert [x[1] for x in rest if x[0] == "token"] == pred.tokens[1:n1]
        assert rest[-1][0] == "done" and rest[-1][1]["stop_reason"] == "cancelled"
        assert m.stats()["tokens_emitted"] == n1 and m.stats()["iters"] == 1


def test_utf8_stop_string_split_across_tokens(plain_model, plain_sm):
    """'é' arrives as two one-byte tokens; a token that only starts a character belongs to it."""
    with mtp_cy.Session(plain_model, n_ctx=128, n_threads=1) as s:
        p = prompt_of(plain_sm, 2)
        g = 'root ::= "a" "é"+'
        s.reset_stats()
        events = list(s.stream_events(p, max_tokens=8, temp=0, grammar=g, stop="é"))
        assert events[-1] == ("stop", "é")
        assert [x[2] for x in events[:-1]] == ["a"]
        assert s.stats()["tokens_emitted"] == 1
        raw = [plain_model.token_to_piece(x[1]) for x in events if x[0] == "token"]
        assert raw == [b"a"]
        assert s.generate(p, max_tokens=8, temp=0, grammar=g, stop=["éa", "éé"]) == "a"
        # no stop: the held character comes out whole
        assert s.generate(p, max_tokens=5, temp=0, grammar=g, stop="é#") == "aéé"


@pytest.mark.parametrize("bad, exc", [("", ValueError), ([""], ValueError), (["ok", ""], ValueError),
                                      (5, TypeError), (["ok", 3], TypeError), (b"x", TypeError),
                                      ({"a": 1}, TypeError)])
def test_invalid_stop_raises_and_session_stays_usable(engine, mtp_sm, bad, exc):
    kind, e = engine
    p = prompt_of(mtp_sm, 3)
    with pytest.raises(exc, match="stop"):
        e.generate(p, max_tokens=4, stop=bad)
    with pytest.raises(exc, match="stop"):
        e.stream_events(p, max_tokens=4, stop=bad)
    assert e.generate(p, max_tokens=6, temp=0, stop=[]) == oracle(mtp_sm, p, 6).text
    assert e.generate(p, max_tokens=6, temp=0, stop=None) == oracle(mtp_sm, p, 6).text


def test_long_stop_strings_stay_cheap(engine, mtp_sm):
    """Holding back is linear in the stop strings' length (no table of every prefix)."""
    import time
    kind, e = engine
    p = prompt_of(mtp_sm, 3)
    text = oracle(mtp_sm, p, 200).text
    never = [text[:3000] + "#", "x" * 20000, text[50:60] + "#" * 5000]
    t0 = time.perf_counter()
    assert e.generate(p, max_tokens=200, temp=0) == text
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert e.generate(p, max_tokens=200, temp=0, stop=never) == text
    held = time.perf_counter() - t0
    assert held < 5 * plain + 0.5, (held, plain)
    ref = check(kind, e, mtp_sm, p, 200, never + [text[700:2500]])
    assert ref["hit"] == text[700:2500]
