# Sampler options: validated in Python, turned into upstream's common_params_sampling.

SAMPLER_DEFAULTS = {
    "temp": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "seed": None,
    "penalty_last_n": 64,
    "penalty_repeat": 1.0,
    "penalty_freq": 0.0,
    "penalty_present": 0.0,
    "grammar": None,
    "grammar_root": "root",
}

import re as _re
_RULE_DEF = _re.compile(r"^\s*([A-Za-z0-9_-]+)\s*::=", _re.M)


cdef double _as_float(str name, value, lo=None, hi=None, lo_open=False) except? -1.0:
    """A finite float option in [lo, hi] (``lo_open``: > lo), named in every error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np
            if not isinstance(value, (np.integer, np.floating)):
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range: {value!r}") from None
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return v


cdef int _as_int(str name, value, lo=-0x80000000, hi=0x7FFFFFFF) except? -1:
    """An int option in [lo, hi] (bounds of a C int by default), named in every error."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np
            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if lo is None:
        lo = -0x80000000
    if hi is None:
        hi = 0x7FFFFFFF
    if value < lo or value > hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


cdef str _grammar_text(const llama_vocab * vocab, grammar, grammar_root):
    """Validate a GBNF grammar (and its root rule) before any work; return the text to use."""
    if grammar is None:
        return None
    if not isinstance(grammar, str):
        raise TypeError(f"grammar must be a GBNF str, got {type(grammar).__name__}")
    if not isinstance(grammar_root, str) or not grammar_root:
        raise TypeError("grammar_root must be a non-empty str")
    text = grammar
    # malformed or pathological grammars (deep nesting, {m,n} with m > n, long rule chains)
    # are refused here with their position: llama.cpp's recursive parser would crash or hang
    _grammar_check.check_grammar(grammar, grammar_root)
    rules = set(_RULE_DEF.findall(grammar))
    if grammar_root != "root":
        if "root" in rules:
            raise GrammarError("grammar defines a rule named 'root' and grammar_root="
                               f"{grammar_root!r}; rename one of them")
        text = grammar + f"\nroot ::= {grammar_root}\n"
    cdef bytes b = text.encode("utf-8")
    cdef const char * cb = b
    cdef llama_sampler * s
    _take_errors()
    with nogil:
        s = llama_sampler_init_grammar(vocab, cb, b"root")
    if s == NULL:
        raise GrammarError(_take_errors() or "parse error")
    llama_sampler_free(s)
    return text


cdef void _fill_sampling(common_params_sampling * sp, const llama_vocab * vocab, dict o, int n_ctx) except *:
    """Validate sampler options ``o`` (defaults applied) into ``sp``."""
    sp.temp = _as_float("temp", o["temp"], 0.0)
    sp.top_k = _as_int("top_k", o["top_k"], 0, llama_vocab_n_tokens(vocab))
    sp.top_p = _as_float("top_p", o["top_p"], 0.0, 1.0, True)
    sp.min_p = _as_float("min_p", o["min_p"], 0.0, 1.0)
    seed = o["seed"]
    if seed is None:
        sp.seed = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed
    else:
        sp.seed = <uint32_t>_as_int_u32("seed", seed, 0xFFFFFFFE)
    # -1: the whole context; longer windows than the context mean the same thing
    sp.penalty_last_n = min(_as_int("penalty_last_n", o["penalty_last_n"], -1), n_ctx)
    sp.penalty_repeat = _as_float("penalty_repeat", o["penalty_repeat"], 0.0, None, True)
    sp.penalty_freq = _as_float("penalty_freq", o["penalty_freq"])
    sp.penalty_present = _as_float("penalty_present", o["penalty_present"])
    sp.no_perf = True
    g = _grammar_text(vocab, o["grammar"], o["grammar_root"])
    if g is not None:
        sp.grammar = common_grammar(COMMON_GRAMMAR_TYPE_USER, (<str>g).encode("utf-8"))


SPEC_SAMPLING_RULES = ("rejection", "match")


cdef object _spec_rule(value, str name="spec_sampling"):
    """``spec_sampling``: ``None`` (the default: rejection whenever the sampler is not
    greedy), ``"rejection"`` or ``"match"``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be None, 'rejection' or 'match', got {type(value).__name__}")
    if value not in SPEC_SAMPLING_RULES:
        raise ValueError(f"{name} must be None, 'rejection' or 'match', got {value!r}")
    return value


cdef int64_t _as_int_u32(str name, value, int64_t hi) except? -1:
    """An int in [0, hi] (hi up to 2**32 - 1), named in every error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or value > hi:
        raise ValueError(f"{name} must be an int in [0, {hi}], got {value!r}")
    return value


cdef common_sampler * _make_sampler(const llama_model * model, common_params_sampling * sp) except NULL:
    cdef common_sampler * s = NULL
    try:
        s = common_sampler_init(model, sp[0])
    except RuntimeError as exc:
        raise ValueError(f"invalid sampler settings: {exc}") from None
    if s == NULL:
        raise ValueError(f"invalid sampler settings: {_take_errors() or 'unknown error'}")
    return s
