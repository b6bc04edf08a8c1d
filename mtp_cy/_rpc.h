// mtp_cy's view of ggml's RPC backend (models split across machines).
//
// ggml's RPC client aborts the process when a server fails; vendor/patches/0004 makes it
// record the failure instead (per endpoint: how many connections failed, the last reason,
// whether it was a timeout), answer later requests of that connection without I/O, and
// bound every wait of a client socket by a timeout.  This header reaches those functions
// through the RPC registry's get_proc_address (the backend may be a loadable module) and
// keeps, per model, the failure counts of its servers at load time (`watch`): a count that
// moved means a server of that model failed, and mtp_cy discards what the step computed and
// raises.  No byte of the wire protocol is known here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ggml-backend.h"

namespace mtp_cy_rpc {

typedef ggml_backend_reg_t (*add_server_fn)(const char * endpoint);
typedef void (*start_server_fn)(const char * endpoint, const char * cache_dir, size_t n_threads,
                                size_t n_devices, ggml_backend_dev_t * devices);
typedef void (*set_timeout_fn)(int64_t timeout_us);
typedef int64_t (*endpoint_state_fn)(const char * endpoint, char * err, size_t err_size, bool * timed_out,
                                     int * live, int * failed_open);

static inline ggml_backend_reg_t rpc_reg() {
    return ggml_backend_reg_by_name("RPC");
}

static inline void * rpc_proc(const char * name) {
    ggml_backend_reg_t reg = rpc_reg();
    return reg ? ggml_backend_reg_get_proc_address(reg, name) : nullptr;
}

// the build's RPC client has vendor/patches/0004 (failures reported, waits bounded)
static inline bool guard_supported() {
    return rpc_proc("ggml_backend_rpc_endpoint_state") != nullptr && rpc_proc("ggml_backend_rpc_set_timeout") != nullptr;
}

// every wait of a client connection (connect, send, recv) at most timeout_us; 0: no limit
static inline void set_timeout(int64_t timeout_us) {
    auto f = (set_timeout_fn) rpc_proc("ggml_backend_rpc_set_timeout");
    if (f) {
        f(timeout_us);
    }
}

struct state {
    int64_t     failures = 0;
    std::string error;
    bool        timed_out = false;
    int         live = 0;
    int         failed_open = 0;
};

static inline state endpoint_state(const std::string & endpoint) {
    state st;
    auto f = (endpoint_state_fn) rpc_proc("ggml_backend_rpc_endpoint_state");
    if (f) {
        char buf[1024];
        st.failures = f(endpoint.c_str(), buf, sizeof(buf), &st.timed_out, &st.live, &st.failed_open);
        st.error = buf;
    }
    return st;
}

static inline int64_t failures(const std::string & endpoint) {
    return endpoint_state(endpoint).failures;
}

// The failure counts of the servers one model depends on, taken when it was loaded.
struct watch {
    std::vector<std::string> endpoints;
    std::vector<int64_t> base;

    void add(const std::string & endpoint) {
        endpoints.push_back(endpoint);
        base.push_back(failures(endpoint));
    }
    // index of the first server that failed since (or -1)
    int failed() const {
        for (size_t i = 0; i < endpoints.size(); i++) {
            if (failures(endpoints[i]) != base[i]) {
                return (int) i;
            }
        }
        return -1;
    }
    bool any_failed() const {
        return failed() >= 0;
    }
};

static inline ggml_backend_reg_t add_server(const std::string & endpoint) {
    auto f = (add_server_fn) rpc_proc("ggml_backend_rpc_add_server");
    return f ? f(endpoint.c_str()) : nullptr;
}

static inline bool start_server(const std::string & endpoint, const char * cache_dir, size_t n_threads,
                                std::vector<ggml_backend_dev_t> & devices) {
    auto f = (start_server_fn) rpc_proc("ggml_backend_rpc_start_server");
    if (!f) {
        return false;
    }
    f(endpoint.c_str(), cache_dir, n_threads, devices.size(), devices.data());
    return true;
}

}  // namespace mtp_cy_rpc
