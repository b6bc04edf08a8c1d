// Small C++ helpers shared by mtp_cy's Cython code: lock-free statistics
// counters, the state read by llama.cpp's abort callback, the shared CPU
// thread pools with the CPU lock, and the conversion of C++ exceptions into
// messages.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
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
// CPU thread pools, shared by every session of the process, and the CPU lock.
//
// llama.cpp is built without OpenMP: an OpenMP team belongs to the OS thread
// that starts a parallel region, so every Python thread (asyncio workers,
// thread pools, web servers) would get its own team, the idle teams would
// spin against the busy one and generation would be several times slower off
// the main thread.  Instead mtp_cy attaches ggml thread pools to its contexts:
// the calling thread joins the pool as worker 0 for the duration of a graph,
// so the speed does not depend on which thread calls.
//
// One pool per thread count, shared by every session that asks for that many
// threads (refcounted), so a process holding many sessions has one set of
// helper threads, not one per session.  After a graph ggml's helpers poll for
// the next one (~100-200 ms) before they sleep: good within a call, a thief of
// CPU time for whatever runs next.  So:
//  * native steps take the process-wide CPU lock (a ticket lock: FIFO, so two
//    sessions used from two threads alternate step by step instead of running
//    two thread pools on the same cores, where each graph's barriers would wait
//    for a thread that the other pool's spinner keeps off its core);
//  * a step that takes the lock with another pool than the one that ran last
//    pauses every other pool first (its helpers stop polling and sleep);
//  * when a session's call ends and no other call uses its pool and no step
//    waits for the lock, the pool is paused.
// ggml resumes a paused pool by itself when the next graph starts.
// The pool functions come from the CPU backend's registry entry (the CPU
// backend is a loadable module in the portable builds); pause/resume are
// exposed there by vendor/patches/0001 (without it, pools are never paused).
// ---------------------------------------------------------------------------
typedef ggml_threadpool_t (*mtp_cy_tp_new_fn)(struct ggml_threadpool_params * params);
typedef void (*mtp_cy_tp_fn)(ggml_threadpool_t tp);

static inline ggml_backend_reg_t mtp_cy_cpu_reg() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    return dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
}

static inline void * mtp_cy_cpu_proc(const char * name) {
    ggml_backend_reg_t reg = mtp_cy_cpu_reg();
    return reg ? ggml_backend_reg_get_proc_address(reg, name) : nullptr;
}

struct mtp_cy_pool {
    ggml_threadpool_t tp = nullptr;
    int  n_threads = 0;
    int  refs = 0;          // sessions attached to it
    int  active = 0;        // calls (streams) running on it
    bool paused = true;     // as far as mtp_cy knows (ggml resumes it on the next graph)
    int64_t n_paused = 0;   // times mtp_cy paused it (diagnostics)
};

struct mtp_cy_cpu_state {
    std::mutex m;                   // guards everything below; never held during a graph
    std::condition_variable cv;
    uint64_t next = 0;              // ticket lock: next ticket to hand out
    uint64_t serving = 0;           //              ticket now allowed to compute
    ggml_threadpool_t last = nullptr;   // the pool of the last step
    std::vector<mtp_cy_pool *> pools;
    mtp_cy_tp_fn pause = nullptr;
    bool looked_up = false;
    bool pause_idle = true;         // pause a pool when its last call ends (tests/benchmarks turn it off)
};

// process-wide and never destroyed (helper threads may outlive static destructors)
static inline mtp_cy_cpu_state & mtp_cy_cpu() {
    static mtp_cy_cpu_state * s = new mtp_cy_cpu_state();
    return *s;
}

static inline mtp_cy_pool * mtp_cy_pool_of(mtp_cy_cpu_state & c, ggml_threadpool_t tp) {
    for (auto * p : c.pools) {
        if (p->tp == tp) {
            return p;
        }
    }
    return nullptr;
}

// call with c.m held
static inline void mtp_cy_pool_pause_locked(mtp_cy_cpu_state & c, mtp_cy_pool * p) {
    if (!c.looked_up) {
        c.pause = (mtp_cy_tp_fn) mtp_cy_cpu_proc("ggml_threadpool_pause");
        c.looked_up = true;
    }
    if (p && !p->paused && c.pause) {
        c.pause(p->tp);
        p->paused = true;
        p->n_paused++;
    }
}

// The shared pool for n_threads (created paused on first use); nullptr without a CPU backend.
static inline ggml_threadpool_t mtp_cy_threadpool_new(int n_threads) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    for (auto * p : c.pools) {
        if (p->n_threads == n_threads) {
            p->refs++;
            return p->tp;
        }
    }
    auto fn = (mtp_cy_tp_new_fn) mtp_cy_cpu_proc("ggml_threadpool_new");
    if (!fn) {
        return nullptr;
    }
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    tpp.paused = true;   // helper threads sleep until the first graph
    ggml_threadpool_t tp = fn(&tpp);
    if (!tp) {
        return nullptr;
    }
    auto * p = new mtp_cy_pool();
    p->tp = tp;
    p->n_threads = n_threads;
    p->refs = 1;
    c.pools.push_back(p);
    return tp;
}

// A session lets go of its pool; the last one frees it (its helpers are joined).
static inline void mtp_cy_threadpool_free(ggml_threadpool_t tp) {
    if (!tp) {
        return;
    }
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    mtp_cy_pool * p = mtp_cy_pool_of(c, tp);
    if (!p || --p->refs > 0) {
        return;
    }
    c.pools.erase(std::find(c.pools.begin(), c.pools.end(), p));
    if (c.last == tp) {
        c.last = nullptr;
    }
    auto fn = (mtp_cy_tp_fn) mtp_cy_cpu_proc("ggml_threadpool_free");
    if (fn) {
        fn(tp);
    }
    delete p;
}

// Take the CPU lock before a native step on pool tp (blocks, FIFO); pauses the other pools.
static inline void mtp_cy_cpu_enter(ggml_threadpool_t tp) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::unique_lock<std::mutex> lk(c.m);
    const uint64_t ticket = c.next++;
    c.cv.wait(lk, [&] { return c.serving == ticket; });
    if (c.last != tp) {
        for (auto * p : c.pools) {
            if (p->tp != tp) {
                mtp_cy_pool_pause_locked(c, p);
            }
        }
        c.last = tp;
    }
    if (mtp_cy_pool * p = mtp_cy_pool_of(c, tp)) {
        p->paused = false;   // the step's first graph resumes it
    }
}

static inline void mtp_cy_cpu_leave() {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    {
        std::lock_guard<std::mutex> lk(c.m);
        c.serving++;
    }
    c.cv.notify_all();
}

// A call (stream) starts / ends on pool tp.  The end pauses the pool when nothing else uses it.
static inline void mtp_cy_call_begin(ggml_threadpool_t tp) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    if (mtp_cy_pool * p = mtp_cy_pool_of(c, tp)) {
        p->active++;
    }
}

static inline void mtp_cy_call_end(ggml_threadpool_t tp) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    mtp_cy_pool * p = mtp_cy_pool_of(c, tp);
    if (!p) {
        return;
    }
    if (p->active > 0) {
        p->active--;
    }
    // a step in flight or waiting has paused (or will use) the pools itself
    if (c.pause_idle && p->active == 0 && c.serving == c.next) {
        mtp_cy_pool_pause_locked(c, p);
    }
}

static inline void mtp_cy_set_pause_idle(bool on) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    c.pause_idle = on;
}

// (pools, total helper threads, times paused, whether pausing is available) for diagnostics
static inline void mtp_cy_pools_info(int & n_pools, int & n_helpers, int64_t & n_paused, int & can_pause) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    n_pools = (int) c.pools.size();
    n_helpers = 0;
    n_paused = 0;
    for (auto * p : c.pools) {
        n_helpers += p->n_threads - 1;
        n_paused += p->n_paused;
    }
    if (!c.looked_up) {
        c.pause = (mtp_cy_tp_fn) mtp_cy_cpu_proc("ggml_threadpool_pause");
        c.looked_up = true;
    }
    can_pause = c.pause != nullptr;
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
