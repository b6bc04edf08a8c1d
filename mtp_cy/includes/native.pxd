# Declarations of mtp_cy's own C++ headers: _native.h (lock-free statistics, abort state,
# thread pool, C++ exception text), _mtp.h (the MTP head driver), _policy.h (the
# n_draft="auto" policy) and _cache.h (state checkpoints of the prompt cache).
from libc.stdint cimport int32_t, int64_t, uint8_t
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector
from mtp_cy.includes.ggml cimport ggml_threadpool_t
from mtp_cy.includes.llama cimport llama_context, llama_token, llama_pos

cdef extern from "_native.h" nogil:
    cdef cppclass atomic_i64 "std::atomic<int64_t>":
        pass
    cdef cppclass atomic_int "std::atomic<int>":
        int load()
        void store(int)

    cdef cppclass mtp_cy_stats:
        atomic_i64 iters
        atomic_i64 drafts_generated
        atomic_i64 drafts_accepted
        atomic_i64 tokens_emitted
        atomic_i64 prompt_tokens
        atomic_i64 prompt_tokens_cached
        atomic_i64 calls
        atomic_i64 t_draft_us
        atomic_i64 t_verify_us
        atomic_i64 t_sample_us
        atomic_i64 t_total_us
        atomic_i64 t_prefill_us

    void mtp_cy_add(atomic_i64 & a, int64_t v)
    int64_t mtp_cy_get(const atomic_i64 & a)
    void mtp_cy_reset(atomic_i64 & a)

    cdef cppclass mtp_cy_abort:
        atomic_int cancel
        int64_t deadline_us
        int timed_out
        int check_signals
        int64_t next_signal_check_us
        int interrupted

    cdef cppclass mtp_cy_flag:
        cbool try_acquire()
        void release()
        cbool held()

    string mtp_cy_current_exception_what()
    float mtp_cy_logprobs(const float * logits, int32_t n_vocab, llama_token tok, int32_t top_n,
                          vector[llama_token] & top_ids, vector[float] & top_lps) except +
    ggml_threadpool_t mtp_cy_threadpool_new(int n_threads)
    void mtp_cy_threadpool_free()
    int mtp_cy_cpu_enter(ggml_threadpool_t * tp, int n_threads, cbool in_call, const void * who)
    void mtp_cy_cpu_leave(ggml_threadpool_t tp, int n_threads, const void * who)
    void mtp_cy_call_begin(ggml_threadpool_t tp)
    void mtp_cy_call_end(ggml_threadpool_t tp, const void * who)
    void mtp_cy_set_pause_idle(cbool on)
    void mtp_cy_pools_info(int & n_pools, int & n_helpers, int64_t & n_paused, int & can_pause,
                           int & n_calls, int & budget)


cdef extern from "_policy.h" nogil:
    cdef cppclass mtp_cy_policy:
        int KMAX
        int k_max
        int min_gap
        int max_gap
        double probe_budget
        int lag_window
        int explore_every
        double w_cost
        double decay
        double prior_w
        double prior_a1
        double v_us[18]
        int64_t v_n[18]
        double d_us
        int64_t d_n
        double s_us
        int64_t s_n
        int64_t c_n
        int64_t iter
        int64_t chosen[17]
        int last_k
        int best
        int gap
        void configure(int kmax)
        void reset()
        double accept(int j, int k)
        double expected_tokens(int k)
        double verify_cost(int n)
        double plain_cost()
        void catch_up_fit(double & cf, double & cp)
        double cost(int k)
        double score(int k)
        int choose()
        void observe(int k, int n_acc, double t_verify_us, double t_draft_us, int n_draft_steps,
                     double t_catch_up_us, int n_catch_up, double t_sample_us, int k_chosen)
        # the confidence cut
        int NB
        cbool cut_active
        double tau_mid
        double tau_last
        double pass_ "pass"(int j, int k)
        double p_min
        double refine_z
        int refine_iters
        int plain_run
        int64_t n_drafting
        double calibrated(double p)
        cbool keeps(double p, cbool last)
        double cut_below(cbool last)
        void set_cut(cbool active, int k)
        void observe_confidence(double p, cbool accepted, int position)


cdef extern from "_mtp.h" nogil:
    cdef cppclass mtp_cy_drafter:
        int32_t n_embd
        llama_pos m
        llama_pos r0
        vector[float] probs
        llama_token cut_id
        float cut_p
        int64_t t_catch_up_us
        int32_t n_catch_up
        int64_t t_draft_us
        int32_t n_draft_steps
        void init(llama_context * tgt, llama_context * dft) except +
        void release()
        void reset()
        llama_pos n_rows()
        llama_pos rows_end()
        const float * row(llama_pos p)
        void add_rows(llama_pos pos0, int32_t n, const float * h) except +
        void set_row(llama_pos p, const float * h) except +
        void truncate(llama_pos c) except +
        void skip_to(llama_pos p) except +
        cbool can_reach(llama_pos upto)
        int catch_up(const llama_token * toks, llama_pos upto) except +
        int draft(llama_token last, llama_pos pos0, int32_t n_max, float p_min,
                  vector[llama_token] & out, const mtp_cy_policy * policy) except +


cdef extern from "_cache.h" nogil:
    cdef cppclass mtp_cy_checkpoint:
        llama_pos pos
        vector[uint8_t] state
        vector[float] h

    cdef cppclass mtp_cy_checkpoints:
        vector[mtp_cy_checkpoint] list
        size_t bytes()
        int size()
        void clear()
        cbool save(llama_context * ctx, llama_pos pos, const float * h, int32_t n_embd, int max_n) except +
        int find(llama_pos pos)
        cbool has(llama_pos pos)
        cbool restore(llama_context * ctx, int i) except +
        void drop_after(llama_pos pos)
