# Declarations from common/sampling.h (C++).
from libc.stdint cimport uint32_t
from libcpp cimport bool as cbool
from libcpp.vector cimport vector
from mtp_cy.includes.llama cimport llama_model, llama_context, llama_token, llama_token_data_array
from mtp_cy.includes.common cimport common_params_sampling, llama_tokens

cdef extern from "sampling.h" nogil:
    cdef struct common_sampler:
        pass

    common_sampler * common_sampler_init(const llama_model * model, common_params_sampling & params) except +
    void common_sampler_free(common_sampler * gsmpl)
    # every call that samples or accepts may throw (e.g. the grammar's "Unexpected empty
    # grammar stack after accepting piece"): declared except + so that the exception
    # reaches Python instead of std::terminate
    void common_sampler_accept(common_sampler * gsmpl, llama_token token, cbool is_generated) except +
    void common_sampler_reset(common_sampler * gsmpl) except +
    llama_token common_sampler_sample(common_sampler * gsmpl, llama_context * ctx, int idx,
                                      cbool grammar_first) except +
    # vendor/patches/0002: checked between chunks of the grammar's work; true stops sampling
    # (common_sampler_sample returns LLAMA_TOKEN_NULL)
    void common_sampler_set_abort_callback(common_sampler * gsmpl, cbool (*abort_cb)(void * data) noexcept nogil,
                                           void * data)
    vector[llama_token] common_sampler_sample_and_accept_n(common_sampler * gsmpl, llama_context * ctx,
                                                           const llama_tokens & draft,
                                                           cbool grammar_first) except +
    llama_token_data_array * common_sampler_get_candidates(common_sampler * gsmpl, cbool do_sort) except +
    uint32_t common_sampler_get_seed(const common_sampler * gsmpl)
