// Small C++ helpers shared by mtp_cy's Cython code: lock-free statistics
// counters, the state read by llama.cpp's abort callback, the shared CPU
// thread pools with the CPU budget, and the conversion of C++ exceptions into
// messages.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

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
    // drafts by position (1-based position i at [i-1]): drafted, and accepted (exact counts)
    static constexpr int POS_MAX = 64;
    std::atomic<int64_t> gen_pos[POS_MAX] = {};
    std::atomic<int64_t> acc_pos[POS_MAX] = {};

    // one verification: n_gen tokens drafted, the first n_acc of them accepted
    void add_draft(int32_t n_gen, int32_t n_acc) {
        drafts_generated.fetch_add(n_gen, std::memory_order_relaxed);
        drafts_accepted.fetch_add(n_acc, std::memory_order_relaxed);
        for (int32_t i = 0; i < n_gen && i < POS_MAX; ++i) {
            gen_pos[i].fetch_add(1, std::memory_order_relaxed);
            if (i < n_acc) acc_pos[i].fetch_add(1, std::memory_order_relaxed);
        }
    }
    int64_t gen_at(int i) const { return i >= 0 && i < POS_MAX ? gen_pos[i].load(std::memory_order_relaxed) : 0; }
    int64_t acc_at(int i) const { return i >= 0 && i < POS_MAX ? acc_pos[i].load(std::memory_order_relaxed) : 0; }
    void reset_pos() {
        for (int i = 0; i < POS_MAX; ++i) {
            gen_pos[i].store(0, std::memory_order_relaxed);
            acc_pos[i].store(0, std::memory_order_relaxed);
        }
    }
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
    mtp_cy_abort * link = nullptr;   // one sequence: its call's state (cancel, deadline) stops the decode too
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
// CPU thread pools, shared by every session of the process, and the CPU budget.
//
// llama.cpp is built without OpenMP: an OpenMP team belongs to the OS thread
// that starts a parallel region, so every Python thread (asyncio workers,
// thread pools, web servers) would get its own team, the idle teams would
// spin against the busy one and generation would be several times slower off
// the main thread.  Instead mtp_cy attaches ggml thread pools to its contexts:
// the calling thread joins the pool as worker 0 for the duration of a graph,
// so the speed does not depend on which thread calls.
//
// Pools are shared by the sessions of the process.  Native steps take their
// threads from the process's CPU budget (the CPUs it may run on), first come
// first served, and no more than their share: with k calls open at once, a step
// uses at most budget / k threads (at least 1; never more than its session's
// n_threads).  So two sessions of every CPU used from two threads on a 2-CPU
// machine run side by side with one thread each, instead of two pools of two
// threads on two cores, where each graph's barriers would wait for a thread that
// the other pool keeps off its core; alone, a session gets all of its threads
// back at its next step.  A step takes a pool of the size it runs with that no
// other step is using (a ggml pool runs one graph at a time; a pool bigger than
// the graph would wake its idle helpers for nothing), preferring the one that
// ran last (its helpers are awake); the session's contexts are attached to it
// and set to that many threads.  A new pool is made only when every pool of that
// size is busy, so a process holding many sessions has one set of helper threads
// per size, not one per session.  After a graph ggml's helpers poll for the next
// one (~100-200 ms) before they sleep: good within a call, a thief of CPU time
// for whatever runs next.  So:
//  * a step pauses every pool that no step is using at that moment (their
//    helpers stop polling and sleep);
//  * when a call ends and no other call is on its pool, the pool is paused;
//  * when more calls want the CPU than it has, a session that just computed
//    keeps it for a time slice (MTP_CY_SLICE_US) while it comes back for its
//    next step at once (handing the cores over costs two thread wake-ups, which
//    step by step would halve a small model's speed); the others wait at most
//    one slice.
// ggml resumes a paused pool by itself when the next graph starts.  The pool
// functions come from the CPU backend's registry entry (the CPU backend is a
// loadable module in the portable builds); pause is exposed there by
// vendor/patches/0001 (without it, pools are never paused).
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
    bool running = false;   // a native step computes on it
    int  bound = 0;         // open calls whose session is attached to it
    bool paused = true;     // as far as mtp_cy knows (ggml resumes it on the next graph)
    uint64_t used = 0;      // when a step last took it (for "the one that ran last")
    int64_t n_paused = 0;   // times mtp_cy paused it (diagnostics)
};

struct mtp_cy_cpu_state {
    std::mutex m;                   // guards everything below; never held during a graph
    std::condition_variable cv;
    uint64_t next = 0;              // FIFO admission: next ticket to hand out
    uint64_t serving = 0;           //                 the ticket at the head of the line
    int budget = 0;                 // CPUs the steps may use at once (0: not known yet)
    int in_use = 0;                 // threads of the steps in flight
    const void * owner = nullptr;   // the session whose time slice runs
    int64_t slice_end = 0;          // until when (mtp_cy_now_us)
    uint64_t clock = 0;
    std::vector<mtp_cy_pool *> pools;
    int n_sessions = 0;             // sessions alive (the pools go with the last one)
    int calls = 0;                  // calls open: the CPU budget's shares
    mtp_cy_tp_fn pause = nullptr;
    bool looked_up = false;
    bool pause_idle = true;         // pause a pool when its last call ends (benchmarks turn it off)
};

static const int64_t MTP_CY_SLICE_US = 5000;

static inline int64_t mtp_cy_now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

// process-wide and never destroyed (helper threads may outlive static destructors)
static inline mtp_cy_cpu_state & mtp_cy_cpu() {
    static mtp_cy_cpu_state * s = new mtp_cy_cpu_state();
    return *s;
}

// The CPUs this process may run on (its affinity mask where the OS has one).
static inline int mtp_cy_cpu_count() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) {
            return n;
        }
    }
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? (int) n : 1;
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

// a new pool of n_threads (paused), registered; nullptr without a CPU backend.  c.m held.
static inline mtp_cy_pool * mtp_cy_pool_make_locked(mtp_cy_cpu_state & c, int n_threads) {
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
    c.pools.push_back(p);
    return p;
}

// A session of n_threads starts: a pool of that size to attach its contexts to at first
// (steps may move it to another one, mtp_cy_cpu_enter); nullptr without a CPU backend.
static inline ggml_threadpool_t mtp_cy_threadpool_new(int n_threads) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    if (c.budget <= 0) {
        c.budget = mtp_cy_cpu_count();
    }
    mtp_cy_pool * best = nullptr;
    for (auto * p : c.pools) {
        if (p->n_threads == n_threads && (!best || p->used > best->used)) {
            best = p;
        }
    }
    if (!best) {
        best = mtp_cy_pool_make_locked(c, n_threads);
        if (!best) {
            return nullptr;
        }
    }
    c.n_sessions++;
    return best->tp;
}

// A session ends (its contexts are freed): the pools go with the last session (their
// helpers are joined).
static inline void mtp_cy_threadpool_free() {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    if (--c.n_sessions > 0) {
        return;
    }
    c.n_sessions = 0;
    auto fn = (mtp_cy_tp_fn) mtp_cy_cpu_proc("ggml_threadpool_free");
    for (size_t j = 0; j < c.pools.size();) {
        mtp_cy_pool * p = c.pools[j];
        if (!p->running) {
            if (fn) {
                fn(p->tp);
            }
            delete p;
            c.pools.erase(c.pools.begin() + j);
        } else {
            j++;
        }
    }
}

// Before a native step of a session whose contexts are attached to *tp, wanting n_threads:
// the threads it runs with (its share of the CPU budget, see above) are returned; it waits
// (FIFO) until they fit -- or nothing else runs --, takes a pool of that size that no step
// is using (the one that ran last, else a new one; *tp is set to it: the caller attaches
// its contexts and sets their thread count when they changed) and pauses the pools no step
// is using.  in_call: the step belongs to an open call (counted on the pool it runs on).
static inline int mtp_cy_cpu_enter(ggml_threadpool_t * tp, int n_threads, bool in_call, const void * who) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::unique_lock<std::mutex> lk(c.m);
    if (c.budget <= 0) {
        c.budget = mtp_cy_cpu_count();
    }
    auto share = [&] {
        return std::max(1, std::min(std::max(1, n_threads), c.budget / std::max(1, c.calls)));
    };
    int n = share();
    if (!(who && who == c.owner && c.in_use == 0 && mtp_cy_now_us() < c.slice_end)) {
        // the line: first come first served; a waiter re-checks when its predecessor is
        // admitted, when a step ends outside a slice, and at the end of the running slice
        const uint64_t ticket = c.next++;
        auto ready = [&] {
            n = share();
            return c.serving == ticket && (c.in_use == 0 || c.in_use + n <= c.budget) &&
                   (c.owner == nullptr || c.owner == who || c.in_use > 0 || mtp_cy_now_us() >= c.slice_end);
        };
        while (!ready()) {
            const int64_t wait_us = c.slice_end - mtp_cy_now_us();
            if (wait_us > 0) {
                c.cv.wait_for(lk, std::chrono::microseconds(wait_us));
            } else {
                c.cv.wait(lk);
            }
        }
        c.serving++;
        c.owner = who;
        c.slice_end = mtp_cy_now_us() + MTP_CY_SLICE_US;
    }
    c.in_use += n;
    mtp_cy_pool * cur = mtp_cy_pool_of(c, *tp);
    mtp_cy_pool * pick = nullptr;
    if (cur) {
        for (auto * p : c.pools) {
            if (p->n_threads == n && !p->running && (!pick || p->used > pick->used)) {
                pick = p;
            }
        }
        if (!pick) {
            pick = mtp_cy_pool_make_locked(c, n);
        }
    }
    if (pick) {
        for (auto * p : c.pools) {
            if (p != pick && !p->running) {
                mtp_cy_pool_pause_locked(c, p);
            }
        }
        pick->running = true;
        pick->paused = false;   // the step's first graph resumes it
        pick->used = ++c.clock;
        if (pick != cur && in_call) {
            cur->bound--;
            pick->bound++;
        }
        *tp = pick->tp;
    }
    lk.unlock();
    c.cv.notify_all();          // the next in line may fit as well
    return n;
}

static inline void mtp_cy_cpu_leave(ggml_threadpool_t tp, int n_threads, const void * who) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    bool wake;
    {
        std::lock_guard<std::mutex> lk(c.m);
        c.in_use -= std::max(1, n_threads);
        if (mtp_cy_pool * p = mtp_cy_pool_of(c, tp)) {
            p->running = false;
        }
        // within its slice the session comes back for its next step: the others would only
        // wake up to wait again (they re-check when the slice ends)
        wake = !(who && who == c.owner && mtp_cy_now_us() < c.slice_end);
    }
    if (wake) {
        c.cv.notify_all();
    }
}

// A call (stream) starts / ends on the pool its session is attached to.  The end pauses the
// pool when no other open call is on it and no step runs on it.
static inline void mtp_cy_call_begin(ggml_threadpool_t tp) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    c.calls++;
    if (mtp_cy_pool * p = mtp_cy_pool_of(c, tp)) {
        p->bound++;
    }
}

static inline void mtp_cy_call_end(ggml_threadpool_t tp, const void * who) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    {
        std::lock_guard<std::mutex> lk(c.m);
        if (who && c.owner == who) {
            c.owner = nullptr;      // its slice ends with the call
        }
        if (c.calls > 0) {
            c.calls--;
        }
        mtp_cy_pool * p = mtp_cy_pool_of(c, tp);
        if (p) {
            if (p->bound > 0) {
                p->bound--;
            }
            if (c.pause_idle && p->bound == 0 && !p->running) {
                mtp_cy_pool_pause_locked(c, p);
            }
        }
    }
    c.cv.notify_all();
}

static inline void mtp_cy_set_pause_idle(bool on) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    c.pause_idle = on;
}

// (pools, total helper threads, times paused, whether pausing is available) for diagnostics
static inline void mtp_cy_pools_info(int & n_pools, int & n_helpers, int64_t & n_paused, int & can_pause,
                                     int & n_calls, int & budget) {
    mtp_cy_cpu_state & c = mtp_cy_cpu();
    std::lock_guard<std::mutex> lk(c.m);
    n_calls = c.calls;
    budget = c.budget > 0 ? c.budget : mtp_cy_cpu_count();
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
