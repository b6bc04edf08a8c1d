# Declarations of mtp_cy/_rpc.h: ggml's RPC entry points reached through the backend
# registry, with the failure reporting and bounded waits of vendor/patches/0004.
from libc.stdint cimport int64_t
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector
from mtp_cy.includes.ggml cimport ggml_backend_reg_t, ggml_backend_dev_t

cdef extern from "_rpc.h" namespace "mtp_cy_rpc" nogil:
    cdef cppclass state:
        int64_t failures
        string error
        cbool timed_out
        int live
        int failed_open

    cdef cppclass watch:
        vector[string] endpoints
        void add(const string & endpoint)
        int failed()
        cbool any_failed()

    cbool guard_supported()
    void set_timeout(int64_t timeout_us)
    state endpoint_state(const string & endpoint)
    int64_t failures(const string & endpoint)

    ggml_backend_reg_t rpc_reg()
    ggml_backend_reg_t add_server(const string & endpoint)
    cbool start_server(const string & endpoint, const char * cache_dir, size_t n_threads,
                       vector[ggml_backend_dev_t] & devices)
