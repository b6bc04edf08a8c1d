# Declarations from common/speculative.h (C++).
from libc.stdint cimport int32_t, uint16_t, uint32_t
from libcpp cimport bool as cbool
from mtp_cy.includes.llama cimport llama_token, llama_pos, llama_seq_id
from mtp_cy.includes.common cimport common_params_speculative, common_batch, llama_tokens

cdef extern from "speculative.h" nogil:
    cdef struct common_speculative:
        pass

    cdef cppclass common_speculative_draft_params:
        cbool drafting
        int32_t n_max
        llama_pos pos0
        llama_token id_last
        const llama_tokens * prompt
        llama_tokens * result

    common_speculative * common_speculative_init(common_params_speculative & params, uint32_t n_seq) except +
    void common_speculative_free(common_speculative * spec)
    common_speculative_draft_params & common_speculative_get_draft_params(common_speculative * spec, llama_seq_id seq_id)
    void common_speculative_begin(common_speculative * spec, llama_seq_id seq_id, const llama_tokens & prompt)
    cbool common_speculative_process(common_speculative * spec, const common_batch & batch)
    void common_speculative_draft(common_speculative * spec)
    void common_speculative_accept(common_speculative * spec, llama_seq_id seq_id, uint16_t n_accepted)
    void common_speculative_print_stats(const common_speculative * spec)
