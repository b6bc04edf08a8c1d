// Small C++ helpers shared by mtp_cy's Cython code: lock-free statistics
// counters and the state read by llama.cpp's abort callback.
#pragma once
#include <atomic>
#include <cstdint>

// Cumulative statistics of one session.  Written by the native loop, read by
// stats() from any thread without locks (relaxed atomics: each counter is
// exact on its own; a snapshot taken mid-iteration may mix two iterations).
struct mtp_cy_stats {
    std::atomic<int64_t> iters{0};
    std::atomic<int64_t> drafts_generated{0};
    std::atomic<int64_t> drafts_accepted{0};
    std::atomic<int64_t> tokens_emitted{0};
    std::atomic<int64_t> prompt_tokens{0};
    std::atomic<int64_t> calls{0};
    std::atomic<int64_t> t_draft_us{0};
    std::atomic<int64_t> t_verify_us{0};
    std::atomic<int64_t> t_sample_us{0};
    std::atomic<int64_t> t_total_us{0};
    std::atomic<int64_t> t_prefill_us{0};
};

static inline void mtp_cy_add(std::atomic<int64_t> & a, int64_t v) {
    a.fetch_add(v, std::memory_order_relaxed);
}
static inline int64_t mtp_cy_get(const std::atomic<int64_t> & a) {
    return a.load(std::memory_order_relaxed);
}
static inline void mtp_cy_reset(std::atomic<int64_t> & a) {
    a.store(0, std::memory_order_relaxed);
}

// Read by the abort callback that llama.cpp calls between graph nodes.
struct mtp_cy_abort {
    std::atomic<int> cancel{0};      // set by close()/cancel() from any thread
    int64_t deadline_us = 0;         // ggml_time_us() deadline of the current wait, 0 = none
    int     timed_out = 0;           // set by the callback when the deadline passed
    int     check_signals = 0;       // the loop runs on the Python main thread
    int64_t next_signal_check_us = 0;
    int     interrupted = 0;         // a Python signal handler raised
};

// An atomic flag used as a "session busy" lock (try-lock semantics only).
struct mtp_cy_flag {
    std::atomic<int> v{0};
    bool try_acquire() { int z = 0; return v.compare_exchange_strong(z, 1); }
    void release() { v.store(0); }
    bool held() const { return v.load() != 0; }
};
