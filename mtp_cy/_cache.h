// State checkpoints of the prompt cache (Session/MTP keep their state across
// calls and reuse the longest usable prefix of the next prompt).
//
// An attention KV cache can be cut at any position, but a recurrent state
// (the Gated-DeltaNet layers of Qwen3.5/3.6) or a sliding-window cache only
// exists for the last position: to go back to position c the sequence needs a
// copy of that partial state taken at c (llama.cpp's
// LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY state of a sequence, what llama-server's
// context checkpoints hold).  With MTP the checkpoint also keeps the target's
// hidden row h(c-1), which the MTP head pairs with the token at c.
#pragma once
#include <cstdint>
#include <vector>

#include "llama.h"

struct mtp_cy_checkpoint {
    llama_pos pos = 0;               // the state after positions [0, pos)
    std::vector<uint8_t> state;      // partial state of sequence 0
    std::vector<float> h;            // h(pos-1) of the target (MTP only; empty otherwise)
};

struct mtp_cy_checkpoints {
    std::vector<mtp_cy_checkpoint> list;   // sorted by pos
    llama_seq_id seq = 0;                  // the sequence they belong to (mtp_cy.Batch: a slot's)

    size_t bytes() const {
        size_t n = 0;
        for (const auto & c : list) {
            n += c.state.size() + c.h.size() * sizeof(float);
        }
        return n;
    }

    int size() const { return (int) list.size(); }

    void clear() { list.clear(); }

    // Save the partial state of sequence `seq` as the checkpoint at `pos`
    // (replacing one at the same position); keep at most max_n, dropping the
    // oldest.  Returns false when llama.cpp cannot save the state.
    bool save(llama_context * ctx, llama_pos pos, const float * h, int32_t n_embd, int max_n) {
        if (max_n <= 0) {
            return false;
        }
        const size_t n = llama_state_seq_get_size_ext(ctx, seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
        if (n == 0) {
            return false;
        }
        mtp_cy_checkpoint c;
        c.pos = pos;
        c.state.resize(n);
        if (llama_state_seq_get_data_ext(ctx, c.state.data(), n, seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) != n) {
            return false;
        }
        if (h && n_embd > 0) {
            c.h.assign(h, h + n_embd);
        }
        drop_after(pos - 1);
        list.push_back(std::move(c));
        while ((int) list.size() > max_n) {
            list.erase(list.begin());
        }
        return true;
    }

    // index of the latest checkpoint at or before `pos`, or -1
    int find(llama_pos pos) const {
        for (int i = (int) list.size() - 1; i >= 0; --i) {
            if (list[i].pos <= pos) {
                return i;
            }
        }
        return -1;
    }

    bool has(llama_pos pos) const {
        const int i = find(pos);
        return i >= 0 && list[i].pos == pos;
    }

    // Restore checkpoint i into sequence `seq` and cut the rest of the memory at its
    // position.  Returns false when llama.cpp refuses (the caller clears the memory).
    bool restore(llama_context * ctx, int i) {
        const mtp_cy_checkpoint & c = list[i];
        if (llama_state_seq_set_data_ext(ctx, c.state.data(), c.state.size(), seq,
                                         LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) != c.state.size()) {
            return false;
        }
        return llama_memory_seq_rm(llama_get_memory(ctx), seq, c.pos, -1);
    }

    // forget the checkpoints after `pos` (they describe a history that is gone)
    void drop_after(llama_pos pos) {
        while (!list.empty() && list.back().pos > pos) {
            list.pop_back();
        }
    }
};
