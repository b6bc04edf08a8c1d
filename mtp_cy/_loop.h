// The generation loop of mtp_cy: one or many sequences in one target context and
// one MTP-head context, continuous batching.  Every engine runs on it: a Session is
// its one-sequence case without a drafter, an MTP its one-sequence case with the
// head, a Batch many sequences.  n_draft="auto" decides with the one-sequence policy
// (_policy.h, `solo`) on a step of one sequence and with the batch policy
// (_batch_policy.h) on a step of several.
//
// A step (mtp_cy_loop::step) serves every sequence that is generating:
//   1. the MTP head is fed the tokens each drafting sequence had verified since it
//      last drafted (one MTP-context decode for all of them),
//   2. it drafts, one MTP-context decode per draft depth for every sequence still
//      drafting (the draft length per sequence: its own n_draft, or the policy's
//      choice for the batch, _batch_policy.h),
//   3. one target decode verifies [last, drafts...] of every sequence,
//   4. each sequence's own sampler accepts the longest agreeing prefix plus its next
//      token (upstream's common_sampler_sample_and_accept_n), the rejected tail
//      leaves both memories, and the step's tokens are appended to the sequence's
//      output as one group (what a lone MTP session produces in one iteration).
// A sequence joins between steps (its prompt is processed in chunks, the chunks of every
// joining sequence in one decode: prompts(), prefill()) and
// leaves between steps; nothing one sequence does changes another one's tokens.
//
// Each slot keeps its tokens between calls (the prompt cache of that slot).  The
// Python side (_engine.pxi) owns the locking: step() and prefill() run one at a
// time, with the GIL released.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "common.h"
#include "llama.h"
#include "llama-ext.h"
#include "sampling.h"
#include "_native.h"
#include "_mtp.h"
#include "_batch_policy.h"
#include "_policy.h"
#include "_spec.h"
#include "_cache.h"

// the tokens one step produced for one sequence (a lone MTP iteration)
struct mtp_cy_group {
    int32_t n_tok = 0;          // tokens (the last one may be end-of-generation)
    int32_t n_gen = 0;          // drafts verified
    int32_t n_acc = 0;          // drafts accepted
    int32_t n_lp = 0;           // log-probability records (0 or n_tok)
    int64_t t_draft_us = 0, t_verify_us = 0, t_sample_us = 0, t_total_us = 0;
};

enum {
    MTP_CY_SLOT_FREE = 0,
    MTP_CY_SLOT_PROMPT = 1,     // its call processes the prompt
    MTP_CY_SLOT_GEN = 2,        // in the steps (until `end` says why not)
};

enum {
    MTP_CY_END_NONE = 0,
    MTP_CY_END_TOKENS = 1,      // end-of-generation or max_tokens: the stream ends on its own
    MTP_CY_END_CTX = 2,         // the sequence's context is full
    MTP_CY_END_ABORT = 3,       // the grammar's work was aborted (timeout / cancel)
    MTP_CY_END_FAILED = 4,      // a decode failed: the step's error code is in rc
};

struct mtp_cy_slot {
    llama_seq_id seq = 0;
    // the slot's memory (both contexts): toks[p] is the token at position p
    std::vector<llama_token> toks;
    bool valid = false;
    int64_t last_used = 0;
    // the call
    std::atomic<int> state{MTP_CY_SLOT_FREE};
    int end = MTP_CY_END_NONE;
    int rc = 0;
    uint64_t call_id = 0;
    common_sampler * smpl = nullptr;    // owned while a call holds the slot
    mtp_cy_spec * spec = nullptr;       // spec_sampling="rejection": the call's speculative sampler (owned)
    mtp_cy_abort ab;                    // this call's cancel flag and deadline (grammar work)
    int64_t timeout_us = 0;             // the call's timeout for its next tokens (0: none)
    llama_token last = -1;
    int32_t max_new = 0;                // tokens the call may generate
    int32_t generated = 0;              // tokens generated (end-of-generation not counted)
    int32_t n_ctx = 0;                  // positions this sequence may use
    int32_t k_req = -1;                 // -1: the policy's choice; else a fixed draft length
    int32_t n_top = -1;                 // log-probabilities: top entries (-1: off)
    float p_min = 0.0f;
    int32_t max_groups = 4;             // steps ahead of its reader before it waits
    // the prompt (state MTP_CY_SLOT_PROMPT): processed by the steps, a chunk at a time
    std::vector<llama_token> prompt;
    int32_t ppos = 0;                   // prompt tokens in memory
    bool need_reuse = false;            // the prompt cache was not consulted yet
    uint64_t restore_id = 0;            // a host copy (mtp_cy_saved::id) to restore first (0: none)
    bool cache = true;                  // the call may reuse the slot's memory
    int32_t n_reused = 0;
    int64_t t_prefill_us = 0;
    int32_t ckpt_hint = 0;              // chat(): a position worth a state checkpoint (0: none)
    int32_t last_ckpt = 0;
    // state checkpoints of this slot (memories that cannot be cut at any position)
    mtp_cy_checkpoints ckpts;
    // output not taken yet
    std::deque<llama_token> out;
    std::deque<mtp_cy_group> groups;
    std::deque<float> lp_vals;
    std::deque<llama_token> lp_top_ids;
    std::deque<float> lp_top_vals;
    // the MTP head's state of this sequence
    mtp_cy_drafter dr;
    mtp_cy_acceptance acc;
    std::vector<llama_token> draft;
    int32_t k = 0;                      // this step's draft length
    int32_t i0 = 0;                     // this step's first index in the target batch
    int32_t di = -1;                    // this draft step's index in the head's batch
    bool drafting = false;
    bool produced = false;              // this step appended a group
    // for stats(), from any thread
    std::atomic<int64_t> n_cached{0};
    std::atomic<int64_t> c_iters{0}, c_gen{0}, c_acc{0};

    bool active() const {
        return state.load(std::memory_order_relaxed) == MTP_CY_SLOT_GEN && end == MTP_CY_END_NONE
            && ab.cancel.load() == 0 && (int32_t) groups.size() < max_groups;
    }
};

// A conversation evicted from its slot, kept in host memory (Batch(cache_ram=)): both
// memories' state of the sequence and the MTP head's rows, restorable into any slot.
struct mtp_cy_saved {
    uint64_t id = 0;
    int64_t used = 0;
    std::vector<llama_token> toks;
    std::vector<uint8_t> tgt, dft;
    llama_pos m = 0, r0 = 0;
    std::vector<float> rows;
    size_t bytes() const {
        return tgt.size() + dft.size() + rows.size() * sizeof(float) + toks.size() * sizeof(llama_token);
    }
};

struct mtp_cy_loop {
    llama_context * ctx = nullptr;
    llama_context * ctx_dft = nullptr;      // null: no MTP head (plain steps only)
    const llama_vocab * vocab = nullptr;
    int32_t n_vocab = 0;
    int32_t n_embd = 0;
    int32_t n_batch = 0;
    int32_t n_batch_dft = 0;
    int32_t k_max = 0;                      // the longest draft of any sequence
    int32_t lag_window = 256;
    // an "auto" sequence's prompt reaches the head when it first drafts (eager_head): a Batch,
    // whose steps of several sequences often stay plain; a lone MTP feeds it as it goes
    bool defer_auto_head = false;
    bool needs_checkpoints = false;         // the memory cannot be cut at any position
    // the target keeps rollback snapshots of its recurrent states (n_rs_seq > 0: a head
    // engine on a hybrid model): only a verification can be rolled back, so a prompt
    // chunk's decode does not write them (vendor/patches/0010)
    bool rs_snapshots = false;
    int32_t max_checkpoints = 8;            // per slot (cache_checkpoints)
    int32_t checkpoint_every = 2048;
    bool auto_k = false;
    common_batch tb;                        // target batch
    common_batch db;                        // head batch
    std::vector<std::unique_ptr<mtp_cy_slot>> slots;
    mtp_cy_batch_policy policy;
    // n_draft="auto" on a step of one sequence (an MTP; a Batch while one call generates): the
    // one-sequence policy (_policy.h) chooses the draft length, cuts drafts by their learned
    // confidence and learns from every such step; steps of several sequences are the batch
    // policy's
    mtp_cy_policy * solo = nullptr;
    mtp_cy_policy * solo_now = nullptr;     // this step's: solo, unless the call fixed its n_draft
    std::vector<float> rows_tmp;
    // host copies of evicted conversations (bounded by cache_ram bytes; 0: none kept)
    std::vector<mtp_cy_saved> saved;
    mutable std::mutex saved_mu;           // saved_prefix() runs beside a step (GIL held, no step lock)
    size_t cache_ram = 0;
    uint64_t next_saved = 0;
    int64_t saved_clock = 0;
    std::atomic<int64_t> saved_bytes{0}, saved_n{0}, saved_hits{0};
    // statistics (lock-free)
    std::atomic<int64_t> steps{0};
    std::atomic<int64_t> seq_steps{0};      // sum over steps of the sequences in them
    std::atomic<int> batch_size{0};         // sequences in the last step
    mtp_cy_stats * st = nullptr;            // the engine's statistics (drafts counted per verification)
    // the last step's costs
    int64_t t_draft_us = 0, t_verify_us = 0, t_sample_us = 0, t_total_us = 0;
    int32_t last_gen = 0, last_acc = 0, last_n = 0;     // the last step's drafts and sequences

    ~mtp_cy_loop() { release(); }

    void clear_saved() {
        std::lock_guard<std::mutex> lk(saved_mu);
        saved.clear();
        saved_bytes.store(0);
        saved_n.store(0);
    }

    void release() {
        clear_saved();
        for (auto & s : slots) {
            delete s->spec;
            s->spec = nullptr;
            if (s->smpl) {
                common_sampler_free(s->smpl);
                s->smpl = nullptr;
            }
            s->dr.release();
        }
        tb = common_batch();
        db = common_batch();
        ctx = nullptr;
        ctx_dft = nullptr;
    }

    void init(llama_context * tgt, llama_context * dft, int32_t n_seq, int32_t kmax, bool is_auto) {
        ctx = tgt;
        ctx_dft = dft;
        vocab = llama_model_get_vocab(llama_get_model(tgt));
        n_vocab = llama_vocab_n_tokens(vocab);
        n_batch = (int32_t) llama_n_batch(tgt);
        k_max = dft ? kmax : 0;
        auto_k = dft && is_auto;
        tb = common_batch(tgt);
        const llama_model * m = llama_get_model(tgt);
        needs_checkpoints = llama_model_is_recurrent(m) || llama_model_is_hybrid(m) || llama_model_n_swa(m) > 0;
        rs_snapshots = llama_n_rs_seq(tgt) > 0;
        if (dft) {
            db = common_batch(dft);
            n_batch_dft = (int32_t) llama_n_batch(dft);
            n_embd = llama_model_n_embd_out(llama_get_model(dft));
        }
        slots.clear();
        for (int32_t i = 0; i < n_seq; ++i) {
            slots.emplace_back(new mtp_cy_slot());
            slots.back()->seq = i;
            slots.back()->ckpts.seq = i;
            if (dft) {
                slots.back()->dr.init(tgt, dft);
                slots.back()->dr.seq = i;
            }
        }
        policy.configure(std::max(1, kmax));
    }

    // -- the prompt cache of a slot ------------------------------------------------------
    int32_t prefix(int32_t i, const llama_token * p, int32_t n) const {
        const auto & s = *slots[i];
        if (!s.valid) {
            return 0;
        }
        int32_t L = 0;
        const int32_t have = (int32_t) s.toks.size();
        while (L < have && L < n && s.toks[L] == p[L]) ++L;
        return L;
    }

    // The part of the prompt's shared prefix that slot i can give: all of it on memories that
    // can be cut, else the prompt must extend the memory or go back to a checkpoint.
    int32_t usable_prefix(int32_t i, const llama_token * p, int32_t n) const {
        const auto & s = *slots[i];
        const int32_t L = std::min(prefix(i, p, n), n - 1);
        if (!needs_checkpoints || L >= (int32_t) s.toks.size()) {
            return std::max(0, L);
        }
        const int k = s.ckpts.find(L);
        return k >= 0 ? s.ckpts.list[k].pos : 0;
    }

    void clear_seq(mtp_cy_slot & s) {
        llama_memory_seq_rm(llama_get_memory(ctx), s.seq, -1, -1);
        if (ctx_dft) {
            llama_memory_seq_rm(llama_get_memory(ctx_dft), s.seq, -1, -1);
            s.dr.reset();
        }
        s.toks.clear();
        s.ckpts.clear();
        s.valid = true;
        s.n_cached.store(0);
    }

    // A state checkpoint of slot s at `pos` (memories that cannot be cut only).
    void checkpoint(mtp_cy_slot & s, int32_t pos) {
        if (pos <= 0 || !needs_checkpoints || max_checkpoints <= 0 || !s.valid || s.ckpts.has(pos)) {
            return;
        }
        const float * h = ctx_dft ? s.dr.row(pos - 1) : nullptr;
        s.ckpts.save(ctx, pos, h, ctx_dft ? n_embd : 0, max_checkpoints);
    }

    // -- host copies of evicted conversations -------------------------------------------
    // The longest prefix a host copy shares with the prompt that it can give (on memories
    // that cannot be cut, only a copy the prompt extends); its id in *id (0: none).
    int32_t saved_prefix(const llama_token * p, int32_t n, uint64_t * id) const {
        std::lock_guard<std::mutex> lk(saved_mu);
        int32_t best = 0;
        *id = 0;
        for (const auto & e : saved) {
            int32_t L = 0;
            const int32_t have = (int32_t) e.toks.size();
            while (L < have && L < n && e.toks[L] == p[L]) ++L;
            if (needs_checkpoints && L < have) L = 0;
            L = std::min(L, n - 1);
            if (L > best) {
                best = L;
                *id = e.id;
            }
        }
        return best;
    }

    void drop_saved(size_t i) {
        saved_bytes.fetch_sub((int64_t) saved[i].bytes());
        saved.erase(saved.begin() + (long) i);
        saved_n.store((int64_t) saved.size());
    }

    // Copy slot s's conversation to host memory (evicting the least recently used copies
    // beyond cache_ram).  False when llama.cpp cannot save it or it does not fit.
    bool save_slot(const mtp_cy_slot & s) {
        if (cache_ram == 0 || !s.valid || s.toks.empty()) {
            return false;
        }
        mtp_cy_saved e;
        const size_t n1 = llama_state_seq_get_size_ext(ctx, s.seq, 0);
        e.tgt.resize(n1);
        if (n1 == 0 || llama_state_seq_get_data_ext(ctx, e.tgt.data(), n1, s.seq, 0) != n1) {
            return false;
        }
        if (ctx_dft) {
            const size_t n2 = llama_state_seq_get_size_ext(ctx_dft, s.seq, 0);
            e.dft.resize(n2);
            if (n2 > 0 && llama_state_seq_get_data_ext(ctx_dft, e.dft.data(), n2, s.seq, 0) != n2) {
                return false;
            }
            e.m = s.dr.m;
            e.r0 = s.dr.r0;
            e.rows = s.dr.rows;
        }
        e.toks = s.toks;
        if (e.bytes() > cache_ram) {
            return false;
        }
        std::lock_guard<std::mutex> lk(saved_mu);
        // a copy this one contains (same conversation, shorter) is of no more use
        for (size_t i = saved.size(); i-- > 0;) {
            const auto & o = saved[i];
            if (o.toks.size() <= e.toks.size() && std::equal(o.toks.begin(), o.toks.end(), e.toks.begin())) {
                drop_saved(i);
            }
        }
        while (!saved.empty() && (size_t) saved_bytes.load() + e.bytes() > cache_ram) {
            size_t lru = 0;
            for (size_t i = 1; i < saved.size(); ++i) {
                if (saved[i].used < saved[lru].used) lru = i;
            }
            drop_saved(lru);
        }
        e.id = ++next_saved;
        e.used = ++saved_clock;
        saved_bytes.fetch_add((int64_t) e.bytes());
        saved.push_back(std::move(e));
        saved_n.store((int64_t) saved.size());
        return true;
    }

    // Put host copy `id` into slot s (its memories cleared first); the copy leaves the
    // host cache.  False (the slot then empty) when it is gone or llama.cpp refuses it.
    bool restore_slot(mtp_cy_slot & s, uint64_t id) {
        std::lock_guard<std::mutex> lk(saved_mu);
        size_t i = 0;
        while (i < saved.size() && saved[i].id != id) ++i;
        if (i == saved.size()) {
            return false;
        }
        clear_seq(s);
        mtp_cy_saved & e = saved[i];
        bool ok = llama_state_seq_set_data_ext(ctx, e.tgt.data(), e.tgt.size(), s.seq, 0) == e.tgt.size();
        if (ok && ctx_dft && !e.dft.empty()) {
            ok = llama_state_seq_set_data_ext(ctx_dft, e.dft.data(), e.dft.size(), s.seq, 0) == e.dft.size();
        }
        if (ok) {
            s.toks = e.toks;
            if (ctx_dft) {
                s.dr.m = e.m;
                s.dr.r0 = e.r0;
                s.dr.rows = e.rows;
            }
            s.n_cached.store((int64_t) s.toks.size());
            saved_hits.fetch_add(1);
        }
        drop_saved(i);
        if (!ok) {
            clear_seq(s);
        }
        return ok;
    }

    // Prepare slot i for a prompt of n tokens: keep what its memory shares with the prompt
    // (at most n-1 tokens, the last one is decoded by the first step); returns how many.
    int32_t reuse(int32_t i, const llama_token * p, int32_t n, bool cache) {
        auto & s = *slots[i];
        if (!cache || !s.valid) {
            clear_seq(s);
            return 0;
        }
        const int32_t have = (int32_t) s.toks.size();
        int32_t c = std::min(prefix(i, p, n), n - 1);
        if (c == have) {
            return c;                   // the prompt extends the memory
        }
        if (c <= 0) {
            clear_seq(s);
            return 0;
        }
        if (needs_checkpoints) {
            // a recurrent state only goes back to a checkpoint (see _Engine._reuse)
            const int k = s.ckpts.find(c);
            if (k < 0 || !s.ckpts.restore(ctx, k)) {
                clear_seq(s);
                return 0;
            }
            c = s.ckpts.list[k].pos;
            if (ctx_dft) {
                s.dr.truncate(c);
                if (!s.dr.can_reach(c + 1)) {
                    if (s.dr.m == c && !s.ckpts.list[k].h.empty()) {
                        s.dr.set_row(c - 1, s.ckpts.list[k].h.data());
                    } else {
                        clear_seq(s);
                        return 0;
                    }
                }
            }
            s.ckpts.drop_after(c);
            s.toks.resize(c);
            s.n_cached.store(c);
            return c;
        }
        if (ctx_dft) {
            // the head needs h(c-1) to continue at c (see MTP._hook_cut)
            s.dr.truncate(c);
            if (!s.dr.can_reach(c + 1)) {
                c = s.dr.m == c ? c - 1 : 0;
            }
        }
        if (c <= 0 || !llama_memory_seq_rm(llama_get_memory(ctx), s.seq, c, -1)) {
            clear_seq(s);
            return 0;
        }
        s.toks.resize(c);
        s.n_cached.store(c);
        return c;
    }

    // A chunk of one slot's prompt in a prefill batch: tokens [pos0, pos0+m) at rows [at, at+m).
    struct mtp_cy_chunk {
        mtp_cy_slot * s;
        int32_t pos0, m, at;
    };

    // Is the MTP head fed slot s's prompt as it is processed?  A sequence with a fixed draft
    // length drafts on its first step: yes; one that asked for plain steps: no.  One that
    // follows "auto" on a Batch (defer_auto_head) may not draft for a long while (a
    // compute-bound batch never does): its head is fed when it first drafts, the last
    // lag_window positions (the rule of plain steps), so that plain steps spend nothing on
    // the head (measured: feeding 8 short prompts cost a Batch of 8 calls 2.5% on the 239M
    // model).  The sequences not fed now are fed when they draft, as after plain steps.
    bool eager_head(const mtp_cy_slot & s) const {
        if (s.k_req >= 0) return s.k_req > 0;
        return !auto_k || !defer_auto_head;
    }

    // Process the prompt chunks in `tb` (no logits) in one target decode, then feed the MTP
    // head all of them that it takes now (eager_head) in as few head decodes as its batch
    // allows (the chunks of every joining sequence share the weights' reads, as the steps
    // do).  A slot whose decode failed ends with MTP_CY_END_FAILED; the others go on.  The
    // decode writes no rollback snapshots (nothing rolls back into a prompt).
    void prefill(const std::vector<mtp_cy_chunk> & chunks) {
        if (rs_snapshots) llama_set_rs_snapshots(ctx, false);
        int rc = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, tb.get());
        if (rs_snapshots) llama_set_rs_snapshots(ctx, true);
        for (const auto & c : chunks) {
            auto & s = *c.s;
            if (rc != 0) {
                s.valid = false;
                s.end = MTP_CY_END_FAILED;
                s.rc = rc;
                continue;
            }
            s.toks.insert(s.toks.end(), s.prompt.data() + c.pos0, s.prompt.data() + c.pos0 + c.m);
            s.n_cached.store((int64_t) s.toks.size());
            if (ctx_dft) {
                s.dr.add_rows(c.pos0, c.m, llama_get_embeddings_nextn_ith(ctx, c.at));
                if (!eager_head(s)) {
                    s.dr.lag_at_most(c.pos0 + c.m, lag_window);
                    // (rows that do not join the ones the head last saw leave it a hole)
                    if (!s.dr.can_reach(c.pos0 + c.m)) s.dr.skip_to(s.dr.r0 + 1);
                }
            }
        }
        if (rc != 0 || !ctx_dft) {
            return;
        }
        std::vector<std::pair<mtp_cy_slot *, int32_t>> want;
        for (const auto & c : chunks) {
            if (eager_head(*c.s)) want.push_back({ c.s, c.pos0 + c.m });
        }
        std::vector<mtp_cy_slot *> failed;
        int32_t n_fed = 0;
        rc = feed_head(want, failed, n_fed, false);
        for (auto * s : failed) {
            s->valid = false;
            s->end = MTP_CY_END_FAILED;
            s->rc = rc;
        }
    }

    // Feed the MTP head each listed slot's verified tokens up to its `upto` (the pairs'
    // second), all of them in as few head decodes as its batch allows (prompt chunks and
    // a step's catch-up alike).  Returns 0, or the code of a decode that failed: the slots
    // it served go to `failed`, the rows it may have left behind removed (they keep what
    // was committed before).  n_fed counts the positions fed; `measure` gives each
    // decode's time to the batch policy's head cost model (the steps' catch-ups).
    int feed_head(const std::vector<std::pair<mtp_cy_slot *, int32_t>> & want, std::vector<mtp_cy_slot *> & failed,
                  int32_t & n_fed, bool measure) {
        while (true) {
            db.clear();
            std::vector<std::pair<mtp_cy_slot *, int32_t>> fed;
            for (const auto & w : want) {
                mtp_cy_slot & s = *w.first;
                const int32_t upto = w.second;
                if (s.dr.m >= upto || !s.dr.can_reach(upto) || db.size() >= n_batch_dft) continue;
                const int32_t n = s.dr.add_catch_up(db, s.toks.data(), upto, n_batch_dft - db.size());
                if (n > 0) fed.push_back({ &s, n });
            }
            if (fed.empty()) {
                return 0;
            }
            const int64_t t0 = ggml_time_us();
            const int rc = llama_process(ctx_dft, LLAMA_PROCESS_TYPE_DECODE, db.get());
            if (rc != 0) {
                for (auto & f : fed) {
                    // an interrupted decode may have left some of the batch behind
                    llama_memory_seq_rm(llama_get_memory(ctx_dft), f.first->seq, f.first->dr.m, -1);
                    failed.push_back(f.first);
                }
                return rc;
            }
            if (measure) {
                policy.head.observe(db.size(), (double) (ggml_time_us() - t0));
            }
            for (auto & f : fed) {
                f.first->dr.commit_catch_up(f.second);
                n_fed += f.second;
            }
        }
    }

    // Accept the verified tokens of one sequence (its rows of the last target decode).
    void accept(mtp_cy_slot & sr, int & n_gen_all, int & n_acc_all, int & n_done) {
        mtp_cy_slot * s = &sr;
        std::vector<int> idxs;
        const int32_t n_past = (int32_t) s->toks.size();
        const int32_t nb = 1 + (int32_t) s->draft.size();
        const int64_t ts0 = ggml_time_us();
        if (ctx_dft) {
            rows_tmp.resize((size_t) nb * n_embd);
            for (int32_t j = 0; j < nb; ++j) {
                std::memcpy(rows_tmp.data() + (size_t) j * n_embd, llama_get_embeddings_nextn_ith(ctx, s->i0 + j),
                            (size_t) n_embd * sizeof(float));
            }
            s->dr.add_rows(n_past, nb, rows_tmp.data());
        }
        idxs.resize(nb);
        for (int32_t j = 0; j < nb; ++j) idxs[j] = s->i0 + j;
        const bool learn = solo_now && s->k > 0;
        const std::vector<llama_token> ids = s->spec ? s->spec->verify(ctx, idxs, s->draft, learn ? s->dr.cut_id : -1)
                                                     : common_sampler_sample_and_accept_n(s->smpl, ctx, idxs, s->draft, false);
        if (ids.empty() || s->ab.cancel.load() || s->ab.timed_out || s->ab.interrupted) {
            s->valid = false;
            s->end = MTP_CY_END_ABORT;
            return;
        }
        const int32_t n_acc = (int32_t) ids.size() - 1;
        if (learn) {
            // calibrate the draft's confidence: every drafted token whose predecessors were
            // accepted, and the token a cut left out when the whole draft before it was
            for (int32_t j = 0; j < std::min(n_acc + 1, nb - 1); ++j) {
                solo_now->observe_confidence(s->dr.probs[j], j < n_acc, j + 1);
            }
            if (n_acc == nb - 1 && s->dr.cut_id >= 0) {
                if (s->spec) {
                    // rejection: the cut token would have been kept with probability
                    // min(1, p/q); one draw of that (the call's generator)
                    solo_now->observe_confidence(s->dr.cut_p, s->spec->uniform() * s->dr.cut_p < s->spec->probe_p, nb);
                } else {
                    solo_now->observe_confidence(s->dr.cut_p, ids.back() == s->dr.cut_id, nb);
                }
            }
        }
        if (auto_k && s->k_req < 0) {
            s->acc.observe((int) s->draft.size(), n_acc);
            policy.batch_acc.observe((int) s->draft.size(), n_acc);
        } else if (s->draft.size() > 0) {
            s->acc.observe((int) s->draft.size(), n_acc);
        }
        n_gen_all += (int) s->draft.size();
        n_acc_all += n_acc;
        n_done += 1;
        s->toks.push_back(s->last);
        for (int32_t j = 0; j < n_acc; ++j) s->toks.push_back(ids[j]);
        const int32_t new_past = n_past + 1 + n_acc;
        if (new_past < n_past + nb) {
            llama_memory_seq_rm(llama_get_memory(ctx), s->seq, new_past, -1);
        }
        if (ctx_dft) {
            s->dr.truncate(new_past);
            s->dr.lag_at_most(new_past, lag_window);
        }
        s->last = ids.back();
        mtp_cy_group g;
        g.n_tok = (int32_t) ids.size();
        g.n_gen = (int32_t) s->draft.size();
        g.n_acc = n_acc;
        bool eog = false;
        for (size_t j = 0; j < ids.size(); ++j) {
            s->out.push_back(ids[j]);
            if (llama_vocab_is_eog(vocab, ids[j])) {
                eog = true;
            } else {
                s->generated += 1;
            }
            if (s->n_top >= 0) {
                std::vector<llama_token> ti;
                std::vector<float> tv;
                s->lp_vals.push_back(mtp_cy_logprobs(llama_get_logits_ith(ctx, s->i0 + (int32_t) j), n_vocab, ids[j],
                                                     s->n_top, ti, tv));
                s->lp_top_ids.insert(s->lp_top_ids.end(), ti.begin(), ti.end());
                s->lp_top_vals.insert(s->lp_top_vals.end(), tv.begin(), tv.end());
            }
        }
        g.n_lp = s->n_top >= 0 ? g.n_tok : 0;
        const int64_t ts1 = ggml_time_us();
        g.t_sample_us = ts1 - ts0;
        s->groups.push_back(g);
        s->produced = true;
        s->c_iters.fetch_add(1, std::memory_order_relaxed);
        s->c_gen.fetch_add(g.n_gen, std::memory_order_relaxed);
        s->c_acc.fetch_add(n_acc, std::memory_order_relaxed);
        if (st) st->add_draft(g.n_gen, n_acc);
        s->n_cached.store((int64_t) s->toks.size());
        if (eog || s->generated >= s->max_new) {
            s->end = MTP_CY_END_TOKENS;
        } else if ((int32_t) s->toks.size() >= s->n_ctx) {
            s->end = MTP_CY_END_CTX;
        }
    }

    // Prompts of the calls that joined: the prompt cache first, then chunks of at most
    // `budget` tokens in all, oldest call first.  A prompt done moves its slot into the steps.
    void prompts(int32_t budget) {
        std::vector<mtp_cy_slot *> ps;
        for (auto & up : slots) {
            if (up->state.load(std::memory_order_relaxed) == MTP_CY_SLOT_PROMPT && up->end == MTP_CY_END_NONE
                    && up->ab.cancel.load() == 0) {
                ps.push_back(up.get());
            }
        }
        std::sort(ps.begin(), ps.end(), [](const mtp_cy_slot * a, const mtp_cy_slot * b) { return a->call_id < b->call_id; });
        for (auto * s : ps) {
            const int32_t n = (int32_t) s->prompt.size();
            const int64_t t0 = ggml_time_us();
            if (s->need_reuse) {
                if (s->cache && cache_ram > 0 && s->valid && !s->toks.empty()
                        && (s->restore_id != 0 || prefix(s->seq, s->prompt.data(), n) < (int32_t) s->toks.size())) {
                    save_slot(*s);      // the slot's conversation leaves it: keep a host copy
                }
                if (s->restore_id != 0) {
                    restore_slot(*s, s->restore_id);
                    s->restore_id = 0;
                }
                s->n_reused = reuse(s->seq, s->prompt.data(), n, s->cache);
                s->ppos = s->n_reused;
                s->last_ckpt = s->ppos;
                s->need_reuse = false;
            }
            s->t_prefill_us += ggml_time_us() - t0;
        }
        // chunks of every prompt in one decode, oldest call first, up to the budget
        std::vector<mtp_cy_chunk> chunks;
        while (budget > 0) {
            tb.clear();
            chunks.clear();
            for (auto * s : ps) {
                const int32_t n = (int32_t) s->prompt.size();
                const int32_t room = std::min(budget, n_batch - (int32_t) tb.size());
                if (room <= 0) {
                    break;
                }
                if (s->end != MTP_CY_END_NONE || s->ppos >= n - 1) {
                    continue;
                }
                int32_t m = std::min(room, n - 1 - s->ppos);
                // a long prompt leaves a checkpoint every checkpoint_every tokens, and one where
                // the next turn of a chat will leave this prompt (chat())
                if (needs_checkpoints && s->cache) {
                    m = std::min(m, std::max(1, s->last_ckpt + checkpoint_every - s->ppos));
                    if (s->ppos < s->ckpt_hint) m = std::min(m, s->ckpt_hint - s->ppos);
                }
                const int32_t at = (int32_t) tb.size();
                for (int32_t j = 0; j < m; ++j) {
                    tb.add(s->prompt[s->ppos + j], s->ppos + j, s->seq, false);
                }
                chunks.push_back({ s, s->ppos, m, at });
                budget -= m;
            }
            if (chunks.empty()) {
                break;
            }
            const int64_t t0 = ggml_time_us();
            prefill(chunks);
            const int64_t dt = ggml_time_us() - t0;
            for (const auto & c : chunks) {
                auto * s = c.s;
                s->t_prefill_us += dt;
                if (s->end != MTP_CY_END_NONE) {
                    continue;
                }
                s->ppos += c.m;
                if (s->cache && (s->ppos - s->last_ckpt >= checkpoint_every || s->ppos == s->ckpt_hint)
                        && s->ppos < (int32_t) s->prompt.size() - 1) {
                    checkpoint(*s, s->ppos);
                    s->last_ckpt = s->ppos;
                }
            }
        }
        for (auto * s : ps) {
            const int32_t n = (int32_t) s->prompt.size();
            if (s->cache && s->end == MTP_CY_END_NONE && s->ppos >= n - 1) {
                checkpoint(*s, n - 1);      // where the next call most often resumes
            }
            if (s->end == MTP_CY_END_NONE && s->ppos >= n - 1) {
                s->last = s->prompt[n - 1];
                s->state.store(MTP_CY_SLOT_GEN);
                // its first tokens come in this very step: from here the call's own timeout
                // bounds the sampler's grammar work (the step began under the prompt's)
                s->ab.deadline_us = s->timeout_us > 0 ? ggml_time_us() + s->timeout_us : 0;
            }
        }
    }

    bool has_prompts() const {
        for (auto & up : slots) {
            if (up->state.load(std::memory_order_relaxed) == MTP_CY_SLOT_PROMPT && up->end == MTP_CY_END_NONE
                    && up->ab.cancel.load() == 0) {
                return true;
            }
        }
        return false;
    }

    // One step: prompt work (at most `prompt_budget` tokens, a whole n_batch while nothing
    // generates), then one draft/verify iteration of every generating sequence.  Returns 0,
    // or llama_process's code of a decode that failed (the sequences it served end with
    // MTP_CY_END_FAILED; their memories are cleared on their next call).  Sequences whose
    // sampler was aborted end with MTP_CY_END_ABORT.
    int step(int32_t prompt_budget) {
        {
            bool gen = false;
            for (auto & up : slots) gen = gen || up->active();
            if (has_prompts()) {
                prompts(gen ? prompt_budget : n_batch);
            }
        }
        std::vector<mtp_cy_slot *> act;
        for (auto & up : slots) {
            if (up->active()) act.push_back(up.get());
        }
        const int B = (int) act.size();
        last_gen = last_acc = last_n = 0;
        if (B == 0) {
            return 0;
        }
        const int64_t t0 = ggml_time_us();
        int rc = 0;
        int64_t t_catch = 0;            // feeding the head (solo policy's cost model)
        int32_t n_catch = 0, n_depth = 0;
        // draft lengths
        int k_auto = 0;
        solo_now = (solo && B == 1 && act[0]->k_req < 0) ? solo : nullptr;
        if (auto_k && solo_now) {
            k_auto = solo_now->choose();
        } else if (auto_k) {
            std::vector<mtp_cy_seq_view> views;
            views.reserve(B);
            for (auto * s : act) {
                const int32_t n_past = (int32_t) s->toks.size();
                const int32_t cap = std::max(0, std::min(s->max_new - s->generated - 1, s->n_ctx - n_past - 1));
                views.push_back({ &s->acc, s->k_req, std::min(cap, k_max) });
            }
            k_auto = policy.decide(views).k;
        }
        for (auto * s : act) {
            const int32_t n_past = (int32_t) s->toks.size();
            int32_t k = ctx_dft ? (s->k_req >= 0 ? s->k_req : k_auto) : 0;
            k = std::min(k, s->max_new - s->generated - 1);
            k = std::min(k, s->n_ctx - n_past - 1);
            s->k = std::max(0, k);
            s->draft.clear();
        }
        if (ctx_dft) {
            // 1. feed the head what each drafting sequence verified since it last drafted
            for (auto * s : act) {
                if (s->k > 0) s->dr.lag_at_most((int32_t) s->toks.size(), lag_window);
            }
            const int64_t tc_all = ggml_time_us();
            {
                std::vector<std::pair<mtp_cy_slot *, int32_t>> want;
                for (auto * s : act) {
                    if (s->k > 0) want.push_back({ s, (int32_t) s->toks.size() });
                }
                std::vector<mtp_cy_slot *> failed;
                rc = feed_head(want, failed, n_catch, true);
            }
            t_catch = ggml_time_us() - tc_all;
            // 2. draft: one head decode per depth for every sequence still drafting
            int n_drafting = 0;
            for (auto * s : act) {
                s->drafting = rc == 0 && s->k > 0;
                if (!s->drafting) continue;
                if (s->spec) {
                    s->spec->begin_draft();
                } else {
                    common_sampler_reset(s->dr.smpl);
                }
                const int32_t n_past = (int32_t) s->toks.size();
                const float * h = s->dr.row(n_past - 1);
                if (!h || s->dr.m != n_past) {
                    throw std::logic_error("mtp_cy: draft without the MTP context caught up");
                }
                std::memcpy(s->dr.cur.data(), h, (size_t) n_embd * sizeof(float));
                s->dr.probs.clear();
                s->dr.cut_id = -1;
                s->dr.cut_p = 0.0f;
                ++n_drafting;
            }
            for (int depth = 0; n_drafting > 0 && rc == 0; ++depth) {
                const int64_t tds = ggml_time_us();
                db.clear();
                for (auto * s : act) {
                    if (!s->drafting) continue;
                    const int32_t n_past = (int32_t) s->toks.size();
                    const llama_token tok = depth == 0 ? s->last : s->draft.back();
                    s->di = db.add(tok, n_past + depth, s->seq, true);
                    db.set_embd(s->di, { s->dr.cur.data(), 1, (size_t) n_embd });
                }
                rc = llama_process(ctx_dft, LLAMA_PROCESS_TYPE_DECODE, db.get());
                if (rc != 0) break;
                ++n_depth;
                policy.head.observe(db.size(), (double) (ggml_time_us() - tds));
                for (auto * s : act) {
                    if (!s->drafting) continue;
                    llama_token id;
                    float p;
                    if (s->spec) {
                        // spec_sampling="rejection": drawn from the head's distribution under the
                        // call's sampler (an aborted grammar ends the draft; the verification
                        // then reports the abort)
                        bool aborted = false;   // (the verification's grammar work sees it again)
                        id = s->spec->draft_next(llama_get_logits_ith(ctx_dft, s->di), &p, &aborted);
                        if (id < 0) {
                            s->drafting = false;
                            --n_drafting;
                            continue;
                        }
                    } else {
                        common_sampler_sample(s->dr.smpl, ctx_dft, s->di, true);
                        const llama_token_data_array * cand = common_sampler_get_candidates(s->dr.smpl, true);
                        id = cand->data[0].id;
                        p = cand->data[0].p;
                    }
                    if (p < s->p_min || (solo_now && !solo_now->keeps(p, (int32_t) s->draft.size() + 1 >= s->k))) {
                        // the token that ended the draft: the solo policy learns whether the
                        // target would have kept it
                        s->dr.cut_id = id;
                        s->dr.cut_p = p;
                        if (s->spec) s->spec->drop_last();
                        s->drafting = false;
                        --n_drafting;
                        continue;
                    }
                    if (s->spec) {
                        s->spec->keep_draft(id);
                    } else {
                        common_sampler_accept(s->dr.smpl, id, true);
                    }
                    s->draft.push_back(id);
                    s->dr.probs.push_back(p);
                    if ((int32_t) s->draft.size() >= s->k) {
                        s->drafting = false;
                        --n_drafting;
                        continue;
                    }
                    std::memcpy(s->dr.cur.data(), llama_get_embeddings_nextn_ith(ctx_dft, s->di),
                                (size_t) n_embd * sizeof(float));
                }
            }
            for (auto * s : act) {
                if (s->k > 0) {
                    llama_memory_seq_rm(llama_get_memory(ctx_dft), s->seq, (llama_pos) s->toks.size(), -1);
                }
            }
        }
        const int64_t t1 = ggml_time_us();
        // 3. verify every sequence's tokens in one target decode, 4. accept
        int T = 0;
        int n_gen_all = 0, n_acc_all = 0, n_done = 0;
        for (auto * s : act) s->produced = false;
        tb.clear();
        for (auto * s : act) {
            const int32_t n_past = (int32_t) s->toks.size();
            s->i0 = tb.add(s->last, n_past, s->seq, true);
            for (size_t j = 0; j < s->draft.size(); ++j) {
                tb.add(s->draft[j], n_past + 1 + (int32_t) j, s->seq, true);
            }
        }
        T = tb.size();
        if (rc == 0) {
            rc = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, tb.get());
        }
        const int64_t t_dec = ggml_time_us() - t1;
        if (rc == 0) {
            for (auto * s : act) {
                accept(*s, n_gen_all, n_acc_all, n_done);
            }
        }
        const int64_t t2 = t1 + t_dec;
        if (rc != 0) {
            for (auto * s : act) {
                // the step is abandoned; the memories are cleared on the sequence's next call
                s->valid = false;
                s->end = MTP_CY_END_FAILED;
                s->rc = rc;
            }
            return rc;
        }
        const int64_t t3 = ggml_time_us();
        if (auto_k) {
            policy.observe_target(T, (double) (t2 - t1));     // (a cost is a cost, whoever chose)
        }
        if (auto_k && solo_now) {
            const mtp_cy_slot * s = act[0];
            if (s->produced) {
                solo_now->observe((int) s->draft.size(), s->groups.back().n_acc, (double) (t2 - t1),
                                  (double) (t1 - t0 - t_catch), n_depth, (double) t_catch, n_catch,
                                  (double) (t3 - t2), s->k);
            }
        } else if (auto_k) {
            bool uniform = n_done == B;
            for (auto * s : act) uniform = uniform && s->k_req < 0 && (int32_t) s->draft.size() == k_auto;
            policy.observe_step(B, k_auto, (double) (t3 - t0), uniform, (double) (n_done + n_acc_all));
        }
        last_gen = n_gen_all;
        last_acc = n_acc_all;
        last_n = n_done;
        t_draft_us = t1 - t0;
        t_verify_us = t2 - t1;
        t_sample_us = t3 - t2;
        t_total_us = t3 - t0;
        // the step's time, shared by its sequences' groups (each call's own view of it)
        for (auto * s : act) {
            if (s->produced) {
                auto & g = s->groups.back();
                g.t_draft_us = t_draft_us;
                g.t_verify_us = t_verify_us;
                g.t_total_us = t_total_us;
                g.t_sample_us = t_sample_us;
            }
        }
        steps.fetch_add(1, std::memory_order_relaxed);
        seq_steps.fetch_add(B, std::memory_order_relaxed);
        batch_size.store(B, std::memory_order_relaxed);
        return 0;
    }
};
