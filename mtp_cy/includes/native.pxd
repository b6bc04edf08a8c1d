# Declarations of mtp_cy's own C++ headers: _native.h (lock-free statistics, abort state,
# thread pool, C++ exception text), _mtp.h (the MTP head driver), _policy.h (the
# n_draft="auto" policy), _cache.h (state checkpoints of the prompt cache), _loop.h
# (the loop of mtp_cy.Batch) and _batch_policy.h (its draft-length decision).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libcpp.deque cimport deque
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector
from mtp_cy.includes.ggml cimport ggml_threadpool_t
from mtp_cy.includes.llama cimport llama_context, llama_model, llama_token, llama_pos
from mtp_cy.includes.common cimport common_params_sampling
from mtp_cy.includes.sampling cimport common_sampler

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
        void add_draft(int32_t n_gen, int32_t n_acc)
        int64_t gen_at(int i)
        int64_t acc_at(int i)
        void reset_pos()

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
        mtp_cy_abort * link

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
        double pos_tot[17]
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
        void reset_acceptance()


cdef extern from "_spec.h" nogil:
    cdef cppclass mtp_cy_spec:
        common_sampler * ds
        float probe_p
        void init(const llama_model * model, common_sampler * call_smpl, common_params_sampling & sp,
                  uint32_t seed) except +
        double uniform()
        vector[llama_token] verify(llama_context * ctx, const vector[int] & idxs, const vector[llama_token] & draft,
                                   llama_token probe) except +


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


cdef extern from "_batch_policy.h" nogil:
    cdef cppclass mtp_cy_cost_model:
        double predict(int t)
        int64_t count(int t)

    cdef cppclass mtp_cy_acceptance:
        double p(int i, const mtp_cy_acceptance * prior)
        double expected(int k, const mtp_cy_acceptance * prior)
        double reach[17]
        double acc[17]
        void reset()

    cdef cppclass mtp_cy_decision:
        int k
        int n_seq
        double tokens_per_sec
        double plain_tokens_per_sec
        const char * reason

    cdef cppclass mtp_cy_batch_policy:
        int k_max
        mtp_cy_cost_model target
        mtp_cy_cost_model head
        mtp_cy_acceptance batch_acc
        int64_t steps
        int64_t chosen[17]
        double probe_loss[2]
        int64_t probe_runs[2]
        mtp_cy_decision last
        void configure(int kmax)


cdef extern from "_loop.h" nogil:
    cdef cppclass mtp_cy_group:
        int32_t n_tok
        int32_t n_gen
        int32_t n_acc
        int32_t n_lp
        int64_t t_draft_us
        int64_t t_verify_us
        int64_t t_sample_us
        int64_t t_total_us

    int MTP_CY_SLOT_FREE
    int MTP_CY_SLOT_PROMPT
    int MTP_CY_SLOT_GEN
    int MTP_CY_END_NONE
    int MTP_CY_END_TOKENS
    int MTP_CY_END_CTX
    int MTP_CY_END_ABORT
    int MTP_CY_END_FAILED

    cdef cppclass mtp_cy_slot:
        int32_t seq
        vector[llama_token] toks
        cbool valid
        int64_t last_used
        atomic_int state
        int end
        int rc
        uint64_t call_id
        common_sampler * smpl
        mtp_cy_spec * spec
        mtp_cy_abort ab
        int64_t timeout_us
        llama_token last
        int32_t max_new
        int32_t generated
        int32_t n_ctx
        int32_t k_req
        int32_t n_top
        float p_min
        int32_t max_groups
        vector[llama_token] prompt
        int32_t ppos
        cbool need_reuse
        uint64_t restore_id
        cbool cache
        int32_t n_reused
        int64_t t_prefill_us
        int32_t ckpt_hint
        mtp_cy_checkpoints ckpts
        deque[llama_token] out
        deque[mtp_cy_group] groups
        deque[float] lp_vals
        deque[llama_token] lp_top_ids
        deque[float] lp_top_vals
        mtp_cy_acceptance acc
        atomic_i64 n_cached
        atomic_i64 c_iters
        atomic_i64 c_gen
        atomic_i64 c_acc
        cbool active()

    cdef cppclass mtp_cy_slot_ptr "std::unique_ptr<mtp_cy_slot>":
        mtp_cy_slot * get()

    cdef cppclass mtp_cy_loop:
        llama_context * ctx
        llama_context * ctx_dft
        int32_t k_max
        int32_t lag_window
        cbool defer_auto_head
        cbool needs_checkpoints
        int32_t max_checkpoints
        int32_t checkpoint_every
        cbool auto_k
        vector[mtp_cy_slot_ptr] slots
        mtp_cy_batch_policy policy
        mtp_cy_policy * solo
        atomic_i64 steps
        atomic_i64 seq_steps
        atomic_int batch_size
        mtp_cy_stats * st
        int64_t t_draft_us
        int64_t t_verify_us
        int64_t t_sample_us
        int64_t t_total_us
        size_t cache_ram
        atomic_i64 saved_bytes
        atomic_i64 saved_n
        atomic_i64 saved_hits
        int32_t saved_prefix(const llama_token * p, int32_t n, uint64_t * id)
        void clear_saved()
        int32_t last_gen
        int32_t last_acc
        int32_t last_n
        void release()
        void init(llama_context * tgt, llama_context * dft, int32_t n_seq, int32_t kmax, cbool is_auto) except +
        int32_t prefix(int32_t i, const llama_token * p, int32_t n)
        int32_t usable_prefix(int32_t i, const llama_token * p, int32_t n)
        void clear_seq(mtp_cy_slot & s)
        int32_t reuse(int32_t i, const llama_token * p, int32_t n, cbool cache) except +
        int prefill(int32_t i, const llama_token * p, int32_t pos0, int32_t m) except +
        int step(int32_t prompt_budget) except +
        cbool has_prompts()
