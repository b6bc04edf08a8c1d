# Declarations of mtp_cy/_native.h (lock-free statistics and abort state).
from libc.stdint cimport int64_t
from libcpp cimport bool as cbool

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
