// Small C++ helpers shared by mtp_cy's Cython code: lock-free statistics
// counters, the state read by llama.cpp's abort callback, the per-session
// CPU thread pool and the conversion of C++ exceptions into messages.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "llama.h"

// Cumulative statistics of one session.  Written by the native loop, read by
// stats() from any thread without locks (relaxed atomics: each counter is
// exact on its own; a snapshot taken mid-iteration may mix two iterations).
struct mtp_cy_stats {
    std::atomic<int64_t> iters{0};
    std::atomic<int64_t> drafts_generated{0};
    std::atomic<int64_t> drafts_accepted{0};
    std::atomic<int64_t> tokens_emitted{0};
    std::atomic<int64_t> prompt_tokens{0};
    std::atomic<int64_t> prompt_tokens_cached{0};   // prompt tokens whose state was reused
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

// The message of the C++ exception being handled (call inside a catch block,
// e.g. from Cython's `except +handler`).
static inline std::string mtp_cy_current_exception_what() {
    try {
        throw;
    } catch (const std::exception & e) {
        return e.what();
    } catch (...) {
        return "unknown C++ exception";
    }
}

// ---------------------------------------------------------------------------
// CPU thread pool of a session.
//
// llama.cpp is built without OpenMP: an OpenMP team belongs to the OS thread
// that starts a parallel region, so every Python thread (asyncio workers,
// thread pools, web servers) would get its own team, the idle teams would
// spin against the busy one and generation would be several times slower off
// the main thread.  Instead each session owns one ggml thread pool, attached
// to its contexts: the calling thread joins it as worker 0 for the duration
// of a graph, so the speed does not depend on which thread calls, and a
// session never has more than n_threads - 1 helper threads.  The functions
// come from the CPU backend's registry entry (the CPU backend is a loadable
// module in the portable builds).
// ---------------------------------------------------------------------------
typedef ggml_threadpool_t (*mtp_cy_tp_new_fn)(struct ggml_threadpool_params * params);
typedef void (*mtp_cy_tp_fn)(ggml_threadpool_t tp);

static inline ggml_backend_reg_t mtp_cy_cpu_reg() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    return dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
}

static inline ggml_threadpool_t mtp_cy_threadpool_new(int n_threads) {
    ggml_backend_reg_t reg = mtp_cy_cpu_reg();
    if (!reg) {
        return nullptr;
    }
    auto fn = (mtp_cy_tp_new_fn) ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new");
    if (!fn) {
        return nullptr;
    }
    struct ggml_threadpool_params p = ggml_threadpool_params_default(n_threads);
    p.paused = true;   // helper threads sleep until the first graph
    return fn(&p);
}

static inline void mtp_cy_threadpool_call(ggml_threadpool_t tp, const char * name) {
    ggml_backend_reg_t reg = mtp_cy_cpu_reg();
    if (!tp || !reg) {
        return;
    }
    auto fn = (mtp_cy_tp_fn) ggml_backend_reg_get_proc_address(reg, name);
    if (fn) {
        fn(tp);
    }
}

static inline void mtp_cy_threadpool_free(ggml_threadpool_t tp) {
    mtp_cy_threadpool_call(tp, "ggml_threadpool_free");
}

// Put the helper threads to sleep (no polling) until the next graph.
static inline void mtp_cy_threadpool_pause(ggml_threadpool_t tp) {
    mtp_cy_threadpool_call(tp, "ggml_threadpool_pause");
}

// ---------------------------------------------------------------------------
// Log-probabilities of the model's distribution (the log-softmax of the raw
// logits, before any sampler): the chosen token's, and the top_n most probable
// tokens with theirs (appended to top_ids / top_lps, most probable first).
// ---------------------------------------------------------------------------
static inline float mtp_cy_logprobs(const float * logits, int32_t n_vocab, llama_token tok, int32_t top_n,
                                    std::vector<llama_token> & top_ids, std::vector<float> & top_lps) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < n_vocab; ++i) {
        mx = std::max(mx, logits[i]);
    }
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        sum += std::exp((double) logits[i] - mx);
    }
    const double lse = mx + std::log(sum);
    if (top_n > 0) {
        top_n = std::min(top_n, n_vocab);
        std::vector<int32_t> idx(n_vocab);
        for (int32_t i = 0; i < n_vocab; ++i) {
            idx[i] = i;
        }
        std::partial_sort(idx.begin(), idx.begin() + top_n, idx.end(), [&](int32_t a, int32_t b) {
            return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
        });
        for (int32_t j = 0; j < top_n; ++j) {
            top_ids.push_back(idx[j]);
            top_lps.push_back((float) (logits[idx[j]] - lse));
        }
    }
    return (float) (logits[tok] - lse);
}
