# Declarations from common/common.h and common/log.h (C++).
from libc.stdint cimport int32_t, uint32_t, uint16_t
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector
from mtp_cy.includes.llama cimport (llama_token, llama_pos, llama_seq_id, llama_context,
                                    llama_batch_ext)

cdef extern from "common.h" nogil:
    ctypedef vector[llama_token] llama_tokens

    enum common_sampler_type:
        COMMON_SAMPLER_TYPE_NONE = 0
        COMMON_SAMPLER_TYPE_DRY = 1
        COMMON_SAMPLER_TYPE_TOP_K = 2
        COMMON_SAMPLER_TYPE_TOP_P = 3
        COMMON_SAMPLER_TYPE_MIN_P = 4
        COMMON_SAMPLER_TYPE_TYPICAL_P = 6
        COMMON_SAMPLER_TYPE_TEMPERATURE = 7
        COMMON_SAMPLER_TYPE_XTC = 8
        COMMON_SAMPLER_TYPE_INFILL = 9
        COMMON_SAMPLER_TYPE_PENALTIES = 10
        COMMON_SAMPLER_TYPE_TOP_N_SIGMA = 11
        COMMON_SAMPLER_TYPE_ADAPTIVE_P = 12

    enum common_speculative_type:
        COMMON_SPECULATIVE_TYPE_NONE
        COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE
        COMMON_SPECULATIVE_TYPE_DRAFT_EAGLE3
        COMMON_SPECULATIVE_TYPE_DRAFT_MTP
        COMMON_SPECULATIVE_TYPE_DRAFT_DFLASH
        COMMON_SPECULATIVE_TYPE_DRAFT_DSPARK
        COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE
        COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K
        COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K4V
        COMMON_SPECULATIVE_TYPE_NGRAM_MOD
        COMMON_SPECULATIVE_TYPE_NGRAM_CACHE
        COMMON_SPECULATIVE_TYPE_COUNT

    enum common_grammar_type:
        COMMON_GRAMMAR_TYPE_NONE
        COMMON_GRAMMAR_TYPE_USER
        COMMON_GRAMMAR_TYPE_OUTPUT_FORMAT
        COMMON_GRAMMAR_TYPE_TOOL_CALLS

    cdef cppclass common_grammar:
        common_grammar_type type
        string grammar
        common_grammar()
        common_grammar(common_grammar_type t, string g)

    cdef cppclass common_params_sampling:
        uint32_t seed
        int32_t n_prev
        int32_t top_k
        float top_p
        float min_p
        float temp
        int32_t penalty_last_n
        float penalty_repeat
        float penalty_freq
        float penalty_present
        cbool ignore_eos
        cbool no_perf
        common_grammar grammar
        cbool backend_sampling
        vector[common_sampler_type] samplers

    cdef cppclass common_params_speculative_draft:
        int32_t n_max
        int32_t n_min
        float p_min
        cbool backend_sampling
        llama_context * ctx_tgt
        llama_context * ctx_dft

    cdef cppclass common_params_speculative:
        vector[common_speculative_type] types
        common_params_speculative_draft draft

    cdef cppclass common_batch:
        common_batch()
        common_batch(llama_context * ctx) except +
        llama_batch_ext * get()
        llama_batch_ext * get_sub_batch(int32_t off, int32_t n)
        void clear()
        int32_t add(llama_token id, llama_pos pos, llama_seq_id seq_id, cbool output) except +
        int32_t size()


cdef extern from "log.h" nogil:
    int LOG_LEVEL_TRACE
    int common_log_get_verbosity_thold()
    void common_log_set_verbosity_thold(int verbosity)
    cdef struct common_log:
        pass
    common_log * common_log_main()
    void common_log_pause(common_log * log)
    void common_log_resume(common_log * log)
    void common_log_set_file(common_log * log, const char * file)
    void common_log_set_prefix(common_log * log, cbool prefix)
