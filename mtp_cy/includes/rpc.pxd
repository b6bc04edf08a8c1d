# Declarations of mtp_cy/_rpc.h (the connection guard in front of ggml's RPC client)
# and of ggml's RPC entry points reached through the backend registry.
from libc.stdint cimport int64_t
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector
from mtp_cy.includes.ggml cimport ggml_backend_reg_t, ggml_backend_dev_t

cdef extern from "_rpc.h" namespace "mtp_cy_rpc" nogil:
    cdef cppclass relay:
        pass

    cdef cppclass watch:
        vector[relay *] relays
        void add(relay * r)
        void rebase()
        int failed()
        cbool any_failed()
        void arm(int64_t timeout_us)
        void disarm()

    relay * get_relay(const string & host, int port, string & err)
    string probe(relay * r, int64_t timeout_us, cbool * timed_out)
    int64_t relay_failures(relay * r)
    int relay_live(relay * r)
    int relay_dead_open(relay * r)
    int relay_links(relay * r)
    void relay_set_io_timeout(relay * r, int64_t us)
    string relay_local(relay * r)
    string relay_endpoint(relay * r)
    string relay_error(relay * r, cbool * timeout)
    cbool guard_supported()

    ggml_backend_reg_t rpc_reg()
    ggml_backend_reg_t add_server(const string & endpoint)
    cbool start_server(const string & endpoint, const char * cache_dir, size_t n_threads,
                       vector[ggml_backend_dev_t] & devices)
