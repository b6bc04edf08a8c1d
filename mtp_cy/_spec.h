// Lossless speculative sampling for MTP drafts (spec_sampling="rejection").
//
// Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the head drafts each token
// by *sampling* its own distribution q (made by the call's sampler transforms), and the
// target keeps draft token x with probability min(1, p(x) / q(x)), where p is the
// distribution plain sampling would draw from at that position; on the first rejection the
// token comes from the normalised residual max(0, p - q), and when every draft token is kept
// the next one comes from p.  Every emitted token is then distributed exactly as in plain
// sampling, and a draft token is kept with probability 1 - TV(p, q) instead of p(argmax q)
// (upstream's exact-match rule, spec_sampling="match").
//
// p is the distribution common_sampler_sample draws from, built with the same steps on the
// same sampler state (penalty history, grammar state) as plain sampling at that point
// (vendor/patches/0006 runs those steps on an array of ours):
//   * without a grammar: the chain over the vocabulary (its last stage normalises p);
//   * with one, plain sampling draws from the chain, keeps the token if the grammar allows
//     it and otherwise draws again from the chain applied after the grammar, so
//       p(x) = [x allowed] p_chain(x) + (1 - sum_{allowed} p_chain) p_grammar_first(x).
// q is the chain over the head's logits with the call's sampler state (copied at the start of
// each draft and advanced by the drafted tokens), restricted to the tokens the grammar allows.
// q is kept as a sparse list (the candidates left after top-k / top-p / min-p), p is read in
// place from the candidate array (copied only to mix a grammar's two draws); all randomness
// (drafting, keeping, the residual and the final draw) comes from one generator per call,
// seeded from the call's seed, so a seeded call is reproducible whatever runs beside it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "llama.h"
#include "sampling.h"

// a distribution over candidates (llama_token_data: id, logit, p), without a copy
struct mtp_cy_view {
    const llama_token_data * d = nullptr;
    size_t n = 0;
};

// a sparse distribution: tokens and their probabilities (sum 1)
struct mtp_cy_dist {
    std::vector<llama_token> id;
    std::vector<float> p;
    void clear() { id.clear(); p.clear(); }
    size_t size() const { return id.size(); }
};

struct mtp_cy_spec {
    common_sampler * call = nullptr;       // the call's sampler (not owned)
    common_sampler * ds = nullptr;         // the draft's copy of it (owned)
    const llama_vocab * vocab = nullptr;
    int32_t n_vocab = 0;
    std::mt19937_64 rng;
    // the current draft: q of each drafted token, and q(x) of the token itself
    std::vector<mtp_cy_dist> q;
    std::vector<float> qx;
    // scratch (reused: no allocation per token once warm)
    std::vector<llama_token_data> cand, cand2;
    std::vector<float> dense;              // by token; zero outside what is being looked at
    mtp_cy_dist pu, pc;                    // a grammar's two draws (the chain's; after the grammar)
    std::vector<llama_token_data> mix, res;     // a grammar's mixture; a residual
    // what the last verify() saw: p of the token a confidence cut left out (0 when not asked)
    float probe_p = 0.0f;

    ~mtp_cy_spec() { release(); }

    void release() {
        if (ds) {
            common_sampler_free(ds);
            ds = nullptr;
        }
        call = nullptr;
    }

    // `sp`: the call's sampler settings (ds is made from them); `seed`: the call's seed as its
    // sampler resolved it (common_sampler_get_seed)
    void init(const llama_model * model, common_sampler * call_smpl, common_params_sampling & sp, uint32_t seed) {
        release();
        vocab = llama_model_get_vocab(model);
        n_vocab = llama_vocab_n_tokens(vocab);
        call = call_smpl;
        ds = common_sampler_init(model, sp);
        if (!ds) {
            throw std::runtime_error("failed to create the draft's sampler");
        }
        std::seed_seq ss{ (uint32_t) seed, 0x5bec5a4bu, 0x9e3779b9u };
        rng.seed(ss);
        dense.assign((size_t) n_vocab, 0.0f);
        q.clear();
        qx.clear();
    }

    double uniform() { return (double) (rng() >> 11) * (1.0 / 9007199254740992.0); }

    llama_token_data_array fill(const float * logits) {
        cand.resize((size_t) n_vocab);
        for (int32_t t = 0; t < n_vocab; ++t) {
            cand[t] = llama_token_data{ t, logits[t], 0.0f };
        }
        return llama_token_data_array{ cand.data(), cand.size(), -1, false };
    }

    static void take(const llama_token_data_array & a, mtp_cy_dist & out) {
        out.clear();
        for (size_t i = 0; i < a.size; ++i) {
            if (a.data[i].p > 0.0f) {
                out.id.push_back(a.data[i].id);
                out.p.push_back(a.data[i].p);
            }
        }
    }

    // The tokens of `d` the grammar of sampler `s` allows (d renormalised; its mass before in
    // *kept).  False when the abort callback stopped the grammar.
    bool restrict_to_grammar(common_sampler * s, mtp_cy_dist & d, double * kept) {
        cand2.resize(d.size());
        for (size_t i = 0; i < d.size(); ++i) {
            cand2[i] = llama_token_data{ d.id[i], 0.0f, d.p[i] };
        }
        llama_token_data_array a{ cand2.data(), cand2.size(), -1, false };
        if (!common_sampler_apply_grammar(s, &a)) {
            return false;
        }
        double m = 0.0;
        size_t n = 0;
        for (size_t i = 0; i < a.size; ++i) {
            if (std::isinf(a.data[i].logit) && a.data[i].logit < 0) continue;
            d.id[n] = a.data[i].id;
            d.p[n] = a.data[i].p;
            m += a.data[i].p;
            ++n;
        }
        d.id.resize(n);
        d.p.resize(n);
        *kept = m;
        if (m > 0.0) {
            for (auto & v : d.p) v = (float) (v / m);
        }
        return true;
    }

    // The distribution plain sampling draws from at a logits row, with sampler `s` in its
    // current state (a view of scratch memory, valid until the next call).  False when the
    // abort callback stopped the grammar.
    bool target_dist(common_sampler * s, const float * logits, mtp_cy_view & out) {
        llama_token_data_array a = fill(logits);
        if (!common_sampler_apply(s, &a, false)) {
            return false;
        }
        out.d = a.data;
        out.n = a.size;
        double tot = 0.0;
        for (size_t i = 0; i < a.size; ++i) tot += a.data[i].p;
        if (!(tot > 0.0)) {
            throw std::runtime_error("the sampler left no candidate token");
        }
        if (!common_sampler_grammar_active(s)) {
            return true;
        }
        // the chain's draw is kept with probability `allowed` (the grammar's share of it) ...
        take(a, pu);
        const size_t n_u = pu.size();
        double allowed = 0.0;
        if (!restrict_to_grammar(s, pu, &allowed)) {
            return false;
        }
        if (allowed >= 1.0 - 1e-9 && pu.size() == n_u) {
            return true;                       // every candidate is allowed
        }
        // ... and otherwise plain sampling draws again, from the chain after the grammar
        a = fill(logits);
        if (!common_sampler_apply(s, &a, true)) {
            return false;
        }
        take(a, pc);
        if (pc.id.empty()) {
            throw std::runtime_error("the grammar allows no token here");
        }
        const double w = 1.0 - std::min(1.0, allowed);
        for (size_t i = 0; i < pu.size(); ++i) dense[pu.id[i]] += (float) (pu.p[i] * allowed);
        for (size_t i = 0; i < pc.size(); ++i) dense[pc.id[i]] += (float) (pc.p[i] * w);
        mix.clear();
        for (const mtp_cy_dist * d : { (const mtp_cy_dist *) &pu, (const mtp_cy_dist *) &pc }) {
            for (size_t i = 0; i < d->size(); ++i) {
                const llama_token t = d->id[i];
                if (dense[t] > 0.0f) {
                    mix.push_back(llama_token_data{ t, 0.0f, dense[t] });
                    dense[t] = 0.0f;
                }
            }
        }
        out.d = mix.data();
        out.n = mix.size();
        return true;
    }

    // an index in [0, n) drawn with weights w(i) (they need not sum to 1)
    template <class W>
    size_t pick(size_t n, W w) {
        double tot = 0.0;
        for (size_t i = 0; i < n; ++i) tot += w(i);
        const double r = uniform() * tot;
        double run = 0.0;
        size_t i = 0;
        for (; i + 1 < n; ++i) {
            run += w(i);
            if (run > r) break;
        }
        return i;
    }

    llama_token draw(mtp_cy_view v) {
        return v.d[pick(v.n, [&](size_t i) { return v.d[i].p; })].id;
    }

    // -- drafting ---------------------------------------------------------------------
    // A new draft: the draft's sampler takes the call's state.
    void begin_draft() {
        common_sampler_copy_state(call, ds);
        q.clear();
        qx.clear();
    }

    // The next draft token from the head's logits row: q over the chain's candidates (the
    // grammar's where it constrains), a token drawn from it and q of that token in *p.
    // -1: no candidate (the draft ends).  *aborted: the abort callback stopped the grammar.
    llama_token draft_next(const float * logits, float * p, bool * aborted) {
        *aborted = false;
        llama_token_data_array a = fill(logits);
        if (!common_sampler_apply(ds, &a, false)) {
            *aborted = true;
            return -1;
        }
        q.emplace_back();
        mtp_cy_dist & d = q.back();
        take(a, d);
        if (common_sampler_grammar_active(ds)) {
            double kept = 0.0;
            if (!restrict_to_grammar(ds, d, &kept)) {
                q.pop_back();
                *aborted = true;
                return -1;
            }
        }
        if (d.id.empty()) {
            q.pop_back();
            return -1;
        }
        const size_t i = pick(d.size(), [&](size_t j) { return d.p[j]; });
        const llama_token x = d.id[i];
        const float pr = d.p[i];
        qx.push_back(pr);
        *p = pr;
        return x;
    }

    // The drafted token x (the last draft_next()) stays in the draft: the draft's sampler
    // moves past it.
    void keep_draft(llama_token x) { common_sampler_accept(ds, x, true); }

    // The last draft_next() token is not drafted (a p_min or confidence cut).
    void drop_last() {
        if (!q.empty()) {
            q.pop_back();
            qx.pop_back();
        }
    }

    // -- verification -----------------------------------------------------------------
    // Verify `draft` (drafted by draft_next/keep_draft, in order) against the target's logits
    // rows idxs[0..n] of ctx: the kept draft tokens, then one more token, each accepted into
    // the call's sampler (as common_sampler_sample_and_accept_n returns them; after an
    // end-of-generation draft token nothing more).  Empty when the abort callback stopped the
    // grammar.  With probe >= 0 and every draft token kept, probe_p = p(probe) at the end.
    std::vector<llama_token> verify(llama_context * ctx, const std::vector<int> & idxs,
                                    const std::vector<llama_token> & draft, llama_token probe = -1) {
        std::vector<llama_token> out;
        probe_p = 0.0f;
        const size_t n = draft.size();
        if (q.size() < n) {
            throw std::logic_error("mtp_cy: a draft verified without its distributions");
        }
        if (n == 0 && probe < 0) {
            // nothing drafted: a plain step (the same distribution, without building it)
            const llama_token y = common_sampler_sample(call, ctx, idxs[0], false);
            if (y == LLAMA_TOKEN_NULL) {
                return {};
            }
            common_sampler_accept(call, y, true);
            out.push_back(y);
            return out;
        }
        mtp_cy_view pd;
        for (size_t i = 0; i <= n; ++i) {
            if (!target_dist(call, llama_get_logits_ith(ctx, idxs[i]), pd)) {
                return {};
            }
            if (i == n) {
                if (probe >= 0) {
                    for (size_t j = 0; j < pd.n; ++j) {
                        if (pd.d[j].id == probe) probe_p = pd.d[j].p;
                    }
                }
                const llama_token y = draw(pd);
                common_sampler_accept(call, y, true);
                out.push_back(y);
                break;
            }
            const llama_token x = draft[i];
            float px = 0.0f;
            for (size_t j = 0; j < pd.n; ++j) {
                if (pd.d[j].id == x) { px = pd.d[j].p; break; }
            }
            const double u = uniform();
            if (px > 0.0f && u * (double) qx[i] < (double) px) {
                common_sampler_accept(call, x, true);
                out.push_back(x);
                if (llama_vocab_is_eog(vocab, x) && i + 1 < n) {
                    break;      // nothing is drafted past the end of the text
                }
                continue;
            }
            // rejected: the residual max(0, p - q_i), normalised
            const mtp_cy_dist & qi = q[i];
            for (size_t j = 0; j < qi.size(); ++j) dense[qi.id[j]] = qi.p[j];
            res.clear();
            for (size_t j = 0; j < pd.n; ++j) {
                const float r = pd.d[j].p - dense[pd.d[j].id];
                if (r > 0.0f) {
                    res.push_back(llama_token_data{ pd.d[j].id, 0.0f, r });
                }
            }
            for (size_t j = 0; j < qi.size(); ++j) dense[qi.id[j]] = 0.0f;
            const llama_token y = res.empty() ? draw(pd) : draw(mtp_cy_view{ res.data(), res.size() });
            common_sampler_accept(call, y, true);
            out.push_back(y);
            break;
        }
        return out;
    }
};
