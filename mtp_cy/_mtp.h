// The MTP head state of one sequence in mtp_cy's generation loop (_loop.h drafts
// with it): the model's NextN block (Qwen3.5/3.6 dense and MoE: one trained MTP head).
//
// It does what upstream's `common_speculative_impl_draft_mtp` does in its
// single-head mode (common/speculative.cpp at the pinned commit): the MTP
// context keeps its own KV cache, where the entry at position p is made from
// the token at p and the target's hidden state h(p-1) at the position before
// (the first position pairs with a zero row); a draft starts from the last
// sampled token and h(n_past-1), and each next draft token is fed the MTP
// block's own output row.  The draft sampler is upstream's (top-k 10, the
// candidate with the highest probability wins) and `p_min` cuts the draft at
// the first token whose probability is below it.
//
// What differs is who owns the state.  Upstream keeps the carried hidden row
// inside common_speculative, so a caller cannot move the sequence back to an
// arbitrary position; here the driver stores the target's hidden rows by
// position, so the engine can
//   * roll back to any earlier position (prompt reuse across calls), and
//   * catch the MTP context up lazily: a step that does not draft only keeps
//     the target's row, and the MTP context is fed the missing positions in
//     one batch the next time a draft is needed (a plain step then costs what
//     a step of plain decoding costs).
// The MTP block is a single attention layer, so an entry depends only on its
// token and its paired row: the entries are the same whether they are fed one
// verification batch at a time (upstream) or in a later batch.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "llama.h"
#include "llama-ext.h"
#include "sampling.h"

struct mtp_cy_drafter {
    llama_context * ctx_tgt = nullptr;
    llama_context * ctx_dft = nullptr;
    int32_t n_embd = 0;
    llama_seq_id seq = 0;                // the sequence it drafts for (mtp_cy.Batch: its slot)
    common_sampler * smpl = nullptr;

    // the MTP context holds positions [0, m)
    llama_pos m = 0;
    // target hidden rows h(p) for p in [r0, r0 + n_rows())
    llama_pos r0 = 0;
    std::vector<float> rows;
    std::vector<float> zeros;            // h(-1)
    std::vector<float> cur;              // input row of the next draft step

    // the last draft (mtp_cy_loop::step drafts): probability of each drafted token (as
    // upstream computes it), and the token that ended it by p_min or the confidence cut
    std::vector<float> probs;
    llama_token cut_id = -1;
    float cut_p = 0.0f;

    ~mtp_cy_drafter() { release(); }

    // let go of the contexts (before the draft context is freed)
    void release() {
        if (smpl) {
            common_sampler_free(smpl);
            smpl = nullptr;
        }
        ctx_tgt = nullptr;
        ctx_dft = nullptr;
        rows.clear();
        m = 0;
        r0 = 0;
    }

    void init(llama_context * tgt, llama_context * dft) {
        ctx_tgt = tgt;
        ctx_dft = dft;
        n_embd  = llama_model_n_embd_out(llama_get_model(dft));
        common_params_sampling sp;
        sp.no_perf  = true;
        sp.top_k    = 10;
        sp.samplers = { COMMON_SAMPLER_TYPE_TOP_K };
        smpl = common_sampler_init(llama_get_model(dft), sp);
        if (!smpl) {
            throw std::runtime_error("failed to create the MTP draft sampler");
        }
        llama_set_embeddings_nextn(tgt, true, /*masked*/ false);
        llama_set_embeddings_nextn(dft, true, /*masked*/ true);
        zeros.assign(n_embd, 0.0f);
        cur.assign(n_embd, 0.0f);
        reset();
    }

    // forget everything (the MTP context's memory is cleared by the caller)
    void reset() {
        m  = 0;
        r0 = 0;
        rows.clear();
    }

    llama_pos n_rows() const { return n_embd > 0 ? (llama_pos) (rows.size() / n_embd) : 0; }
    llama_pos rows_end() const { return r0 + n_rows(); }

    const float * row(llama_pos p) const {
        if (p < 0) {
            return zeros.data();
        }
        if (p < r0 || p >= rows_end()) {
            return nullptr;
        }
        return rows.data() + (size_t) (p - r0) * n_embd;
    }

    // Store the target's hidden rows of its last decode (all n rows of the
    // batch, `h` from llama_get_embeddings_nextn) for positions [pos0, pos0+n).
    void add_rows(llama_pos pos0, int32_t n, const float * h) {
        if (rows.empty() || pos0 < r0 || pos0 > rows_end()) {
            rows.clear();
            r0 = pos0;
        } else {
            rows.resize((size_t) (pos0 - r0) * n_embd);
        }
        rows.insert(rows.end(), h, h + (size_t) n * n_embd);
    }

    // Use `h` as h(p) (a row saved with a state checkpoint).
    void set_row(llama_pos p, const float * h) {
        rows.assign(h, h + n_embd);
        r0 = p;
    }

    // The sequence goes back to n_past = c: drop what lies at or after c.
    void truncate(llama_pos c) {
        if (m > c) {
            llama_memory_seq_rm(llama_get_memory(ctx_dft), seq, c, -1);
            m = c;
        }
        if (c <= r0) {
            rows.clear();
            r0 = c;
        } else if (c < rows_end()) {
            rows.resize((size_t) (c - r0) * n_embd);
        }
    }

    // Give up on feeding the MTP context the positions before p that it has not
    // seen (they stay holes in its cache): a head that lagged far behind plain
    // steps only gets the recent positions when drafting resumes.  Drafts may be
    // a little worse right then; the output never changes.
    void skip_to(llama_pos p) {
        if (m >= p) {
            return;
        }
        if (p - 1 > r0 && p - 1 < rows_end()) {
            rows.erase(rows.begin(), rows.begin() + (size_t) (p - 1 - r0) * n_embd);
            r0 = p - 1;
        }
        m = p;
    }

    // The head is fed at most `window` of the positions before `upto` that it missed: the
    // older ones are skipped (the rule after plain steps and for deferred prompts).
    void lag_at_most(llama_pos upto, int32_t window) {
        if (m < upto - window) {
            skip_to(upto - window);
        }
    }

    // Can the MTP context be brought up to `upto` (the rows it needs are known)?
    bool can_reach(llama_pos upto) const {
        if (m >= upto) {
            return true;
        }
        return (m == 0 || (m - 1 >= r0)) && rows_end() >= upto - 1;
    }

    // Drop the rows before h(m-1): the next entry pairs with it.
    void trim() {
        if (m - 1 > r0 && m - 1 < rows_end()) {
            rows.erase(rows.begin(), rows.begin() + (size_t) (m - 1 - r0) * n_embd);
            r0 = m - 1;
        }
    }

    // A batched catch-up (the loop feeds every sequence's missing positions in one
    // MTP-context decode): append the entries [m, min(upto, m + max_n)) to `b`, pairing
    // toks[p] with h(p-1); returns how many.  commit_catch_up(n) after the decode.
    int32_t add_catch_up(common_batch & b, const llama_token * toks, llama_pos upto, int32_t max_n) const {
        const int32_t n = std::max<int32_t>(0, std::min<int32_t>(max_n, upto - m));
        for (int32_t j = 0; j < n; ++j) {
            const llama_pos p = m + j;
            const float * h = row(p - 1);
            if (!h) {
                throw std::logic_error("mtp_cy: MTP catch-up without the target row it needs");
            }
            const int32_t idx = b.add(toks[p], p, seq, false);
            b.set_embd(idx, { h, 1, (size_t) n_embd });
        }
        return n;
    }

    void commit_catch_up(int32_t n) {
        m += n;
        trim();
    }
};
