// mtp_cy's connection guard for ggml's RPC backend.
//
// Why: ggml's RPC client (ggml/src/ggml-rpc/ggml-rpc.cpp) calls GGML_ABORT --
// killing the whole process -- whenever a socket to an rpc-server fails (the
// server was stopped or crashed, the network dropped, a reply was malformed),
// and it waits forever for a server that stops answering.  A Python library
// must not take the interpreter down with it, and we do not patch llama.cpp.
//
// How: ggml never talks to the server directly.  For every server endpoint
// mtp_cy runs a *relay*: a listener on 127.0.0.1:<ephemeral port> that ggml
// connects to instead (the endpoint string handed to ggml_backend_rpc_add_server),
// and that forwards each connection to the real server, one request/reply at a
// time, exactly as received (upstream's wire protocol, unchanged; only the
// HELLO's transport capabilities are cleared so that the connection stays on
// TCP through the relay).  While the server answers, the relay is a transparent
// byte pipe.  When the server fails -- connection refused, closed, reset, a
// reply that does not match the request, no progress within the deadline --
// the relay closes its connection to the server (which then frees this client's
// buffers, as it does for any client that disconnects), records the failure,
// and from then on answers ggml's requests itself with well-formed placeholder
// replies (zeros), so that ggml's code paths complete instead of aborting.
// mtp_cy checks the failure counters after every native step, model load and
// context creation, discards whatever was computed and raises a Python
// exception that names the server.  Freeing a model whose server is gone is
// then safe too: its "free buffer" requests are absorbed by the relay.
//
// The relay only knows the framing of upstream's protocol (version 7.0,
// checked at compile time below): a request is
// | cmd (1 byte) | size (8 bytes) | payload |, a reply | size (8 bytes) | payload |,
// and which commands have a reply of which size.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ggml-backend.h"
#include "ggml-rpc.h"

#if defined(_WIN32)
#define MTP_CY_RPC_GUARD 0
#else
#define MTP_CY_RPC_GUARD 1
#include <arpa/inet.h>
#include <cerrno>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

// a new protocol version may add commands (with replies the relay must forward): review the
// command table below against ggml-rpc.cpp, then update these two numbers
static_assert(RPC_PROTO_MAJOR_VERSION == 7 && RPC_PROTO_MINOR_VERSION == 0,
              "llama.cpp's RPC protocol changed: update the command table of mtp_cy/_rpc.h");

namespace mtp_cy_rpc {

// upstream's enum rpc_cmd (ggml-rpc.cpp, protocol 7)
enum : uint8_t {
    CMD_ALLOC_BUFFER = 0, CMD_GET_ALIGNMENT, CMD_GET_MAX_SIZE, CMD_BUFFER_GET_BASE, CMD_FREE_BUFFER,
    CMD_BUFFER_CLEAR, CMD_SET_TENSOR, CMD_SET_TENSOR_HASH, CMD_GET_TENSOR, CMD_COPY_TENSOR,
    CMD_GRAPH_COMPUTE, CMD_GET_DEVICE_MEMORY, CMD_INIT_TENSOR, CMD_GET_ALLOC_SIZE, CMD_HELLO,
    CMD_DEVICE_COUNT, CMD_GRAPH_RECOMPUTE, CMD_MEMSET_TENSOR, CMD_NONE, CMD_COUNT,
};
static const size_t CAPS_SIZE = 24;               // RPC_CONN_CAPS_SIZE (transport.h)
static const int64_t NO_REPLY = -1;

// Size of the reply to a request (NO_REPLY when the command has none).  `tail`
// holds the last 8 bytes of the request payload (GET_TENSOR's requested size).
static inline int64_t reply_size(uint8_t cmd, const uint8_t * tail, uint64_t req_size) {
    switch (cmd) {
        case CMD_ALLOC_BUFFER:      return 16;     // remote_ptr, remote_size
        case CMD_GET_ALIGNMENT:     return 8;
        case CMD_GET_MAX_SIZE:      return 8;
        case CMD_BUFFER_GET_BASE:   return 8;
        case CMD_SET_TENSOR_HASH:   return 1;
        case CMD_COPY_TENSOR:       return 1;
        case CMD_GET_DEVICE_MEMORY: return 16;     // free, total
        case CMD_GET_ALLOC_SIZE:    return 8;
        case CMD_HELLO:             return 4 + CAPS_SIZE;
        case CMD_DEVICE_COUNT:      return 4;
        case CMD_GET_TENSOR: {
            if (req_size < 16) {
                return 0;
            }
            uint64_t n;
            memcpy(&n, tail, 8);
            return (int64_t) n;
        }
        default:                    return NO_REPLY;
    }
}

static inline int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One relay per server endpoint, alive for the whole process.
struct relay {
    std::string host;                 // the server: IPv4 address and port
    int port = 0;
    std::string endpoint;             // "host:port"
    std::string local;                // "127.0.0.1:<port>": what ggml connects to
    int lfd = -1;
    // Limits on waiting for the server (progress of one read or write):
    // stream_deadline: -1 = no stream running (use io_timeout_us), 0 = a stream
    // without a timeout is running (no limit), > 0 = absolute now_us() deadline.
    std::atomic<int64_t> io_timeout_us{30 * 1000000LL};
    std::atomic<int64_t> stream_deadline{-1};
    std::atomic<int64_t> failures{0};  // connections to the server that failed
    std::atomic<int> live{0};          // connections currently forwarding to the server
    std::atomic<int> dead_open{0};     // failed connections that ggml still holds
    std::atomic<int> links{0};         // connections from ggml currently open
    std::mutex mu;
    std::string error;                 // the last failure, for messages
    bool error_timeout = false;

    int64_t wait_deadline() const {
        int64_t d = stream_deadline.load();
        if (d >= 0) {
            return d;                  // 0: no limit
        }
        int64_t t = io_timeout_us.load();
        return t > 0 ? now_us() + t : 0;
    }

    void record_failure(const std::string & why, bool timeout) {
        {
            std::lock_guard<std::mutex> lk(mu);
            error = why;
            error_timeout = timeout;
        }
        failures.fetch_add(1);
    }

    std::string last_error(bool * timeout) {
        std::lock_guard<std::mutex> lk(mu);
        if (timeout) {
            *timeout = error_timeout;
        }
        return error;
    }
};

#if MTP_CY_RPC_GUARD

static inline void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
#ifdef SO_NOSIGPIPE
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));   // macOS: no MSG_NOSIGNAL
#endif
}

static inline std::string errno_text(int e) {
    return std::string(strerror(e));
}

// why a send/recv on the server connection failed, in words
static inline std::string lost_text(int e, const char * what) {
    if (e == EPIPE || e == ECONNRESET || e == ENOTCONN) {
        return std::string("the server closed the connection (it stopped or crashed) while ") + what;
    }
    return std::string("connection lost while ") + what + " (" + errno_text(e) + ")";
}

// wait until fd is ready for `events`; 1 ready, 0 deadline passed, -1 error
static inline int wait_fd(int fd, short events, int64_t deadline) {
    for (;;) {
        int ms = -1;
        if (deadline > 0) {
            int64_t left = deadline - now_us();
            if (left <= 0) {
                return 0;
            }
            ms = (int) std::min<int64_t>((left + 999) / 1000, 1000 * 1000);
        }
        struct pollfd p;
        p.fd = fd;
        p.events = events;
        p.revents = 0;
        int r = poll(&p, 1, ms);
        if (r > 0) {
            return 1;     // ready or error/hangup: the following call reports which
        }
        if (r < 0 && errno != EINTR) {
            return -1;
        }
        if (r == 0 && deadline > 0 && now_us() >= deadline) {
            return 0;
        }
    }
}

// connect to host:port within `timeout_us` (0 = the system's own limit); -1 and `why` on failure
static inline int connect_timeout(const std::string & host, int port, int64_t timeout_us,
                                  std::string & why, bool & timed_out) {
    timed_out = false;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        why = "cannot create a socket: " + errno_text(errno);
        return -1;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t) port);
    if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
        close(fd);
        why = "not an IPv4 address: " + host;
        return -1;
    }
    int flags = fcntl(fd, F_GETFL, 0);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int r = connect(fd, (struct sockaddr *) &addr, sizeof(addr));
    if (r < 0 && errno != EINPROGRESS) {
        why = "cannot connect: " + errno_text(errno);
        close(fd);
        return -1;
    }
    if (r < 0) {
        int w = wait_fd(fd, POLLOUT, timeout_us > 0 ? now_us() + timeout_us : 0);
        if (w <= 0) {
            timed_out = (w == 0);
            why = w == 0 ? "no answer to the connection attempt within the timeout" : "cannot connect";
            close(fd);
            return -1;
        }
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            why = "cannot connect: " + errno_text(err);
            close(fd);
            return -1;
        }
    }
    set_nodelay(fd);
    return fd;     // stays non-blocking: every read/write waits with poll first
}

// the connection to the server: non-blocking fd, every wait bounded by the relay's deadline
// read exactly n bytes with `some(ptr, max)` (bytes read, 0 on failure or end of stream)
template <typename F>
static inline bool recv_fully(void * data, size_t n, F && some) {
    uint8_t * p = (uint8_t *) data;
    while (n > 0) {
        size_t k = some(p, n);
        if (k == 0) {
            return false;
        }
        p += k;
        n -= k;
    }
    return true;
}

struct upstream {
    relay * r;
    int fd = -1;
    std::string why;
    bool timed_out = false;

    bool send_all(const void * data, size_t n, const char * what) {
        const uint8_t * p = (const uint8_t *) data;
        int64_t deadline = r->wait_deadline();
        while (n > 0) {
            ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
            if (k > 0) {
                p += k;
                n -= (size_t) k;
                deadline = r->wait_deadline();     // progress: the limit starts again
                continue;
            }
            if (k < 0 && (errno == EINTR)) {
                continue;
            }
            if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                int w = wait_fd(fd, POLLOUT, deadline);
                if (w == 0) {
                    timed_out = true;
                    why = std::string("the server stopped reading (no progress within the timeout) while ") + what;
                    return false;
                }
                if (w < 0) {
                    why = std::string("connection error while ") + what;
                    return false;
                }
                continue;
            }
            why = lost_text(errno, what);
            return false;
        }
        return true;
    }

    // read at least 1 and at most n bytes; 0 on failure
    size_t recv_some(void * data, size_t n, const char * what) {
        int64_t deadline = r->wait_deadline();
        for (;;) {
            ssize_t k = ::recv(fd, data, n, 0);
            if (k > 0) {
                return (size_t) k;
            }
            if (k == 0) {
                why = std::string("the server closed the connection (it stopped or crashed) while ") + what;
                return 0;
            }
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int w = wait_fd(fd, POLLIN, deadline);
                if (w == 0) {
                    timed_out = true;
                    why = std::string("no reply from the server within the timeout while ") + what;
                    return 0;
                }
                if (w < 0) {
                    why = std::string("connection error while ") + what;
                    return 0;
                }
                continue;
            }
            why = lost_text(errno, what);
            return 0;
        }
    }

    bool recv_all(void * data, size_t n, const char * what) {
        return recv_fully(data, n, [&](uint8_t * p, size_t k) { return recv_some(p, k, what); });
    }
};

// the connection from ggml (blocking; ggml is in this process and always reads its replies)
static inline bool client_send(int fd, const void * data, size_t n) {
    const uint8_t * p = (const uint8_t *) data;
    while (n > 0) {
        ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k <= 0) {
            return false;
        }
        p += k;
        n -= (size_t) k;
    }
    return true;
}

static inline size_t client_recv_some(int fd, void * data, size_t n) {
    for (;;) {
        ssize_t k = ::recv(fd, data, n, 0);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        return k > 0 ? (size_t) k : 0;
    }
}

static inline bool client_recv_all(int fd, void * data, size_t n) {
    return recv_fully(data, n, [fd](uint8_t * p, size_t k) { return client_recv_some(fd, p, k); });
}

// Placeholder reply bytes [from, from + n) of command `cmd` after the server failed:
// well-formed values that keep ggml on its normal code paths (never read as results:
// mtp_cy raises as soon as the step / load / context creation returns).
static inline void placeholder(uint8_t cmd, const uint8_t * head, uint8_t * out, size_t n, uint64_t from) {
    memset(out, 0, n);
    uint8_t full[32];
    size_t full_n = 0;
    memset(full, 0, sizeof(full));
    switch (cmd) {
        case CMD_HELLO:
            full[0] = RPC_PROTO_MAJOR_VERSION;
            full[1] = RPC_PROTO_MINOR_VERSION;
            full[2] = RPC_PROTO_PATCH_VERSION;
            full_n = 4 + CAPS_SIZE;
            break;
        case CMD_ALLOC_BUFFER: {
            // a non-null remote handle and the requested size (| device u32 | size u64 |)
            static std::atomic<uint64_t> next{1};
            uint64_t handle = 0x6d7470637900000ULL + (next.fetch_add(1) << 12);
            uint64_t size;
            memcpy(&size, head + 4, 8);
            memcpy(full, &handle, 8);
            memcpy(full + 8, &size, 8);
            full_n = 16;
            break;
        }
        case CMD_GET_ALIGNMENT: {
            uint64_t a = 512;
            memcpy(full, &a, 8);
            full_n = 8;
            break;
        }
        case CMD_GET_MAX_SIZE: {
            uint64_t m = UINT64_MAX;
            memcpy(full, &m, 8);
            full_n = 8;
            break;
        }
        case CMD_BUFFER_GET_BASE: {
            uint64_t b = 0x1000000000ULL;
            memcpy(full, &b, 8);
            full_n = 8;
            break;
        }
        default:
            break;    // zeros: no devices, no memory, "not cached", "not copied", tensor data 0
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t pos = from + i;
        if (pos < full_n) {
            out[i] = full[pos];
        }
    }
}

static void link_serve(relay * r, int cfd);

// one thread per connection from ggml; nothing may escape it (std::terminate would abort)
static void link_main(relay * r, int cfd) {
    try {
        link_serve(r, cfd);
    } catch (...) {
        // only reachable when memory is exhausted (std::bad_alloc); an exception escaping a
        // thread would terminate the process, a closed connection is what ggml would see anyway
        close(cfd);
    }
}

static void link_serve(relay * r, int cfd) {
    set_nodelay(cfd);
    r->links.fetch_add(1);
    upstream up;
    up.r = r;
    bool dead = false;
    auto go_dead = [&](const std::string & why, bool timeout) {
        if (dead) {
            return;
        }
        dead = true;
        if (up.fd >= 0) {
            shutdown(up.fd, SHUT_RDWR);
            close(up.fd);
            up.fd = -1;
            r->live.fetch_sub(1);
        }
        r->dead_open.fetch_add(1);
        r->record_failure("RPC server " + r->endpoint + ": " + why, timeout);
    };
    {
        std::string why;
        bool to = false;
        int64_t d = r->wait_deadline();
        int64_t t = d > 0 ? std::max<int64_t>(d - now_us(), 1) : 0;
        int fd = connect_timeout(r->host, r->port, t, why, to);
        if (fd >= 0) {
            up.fd = fd;
            r->live.fetch_add(1);
        } else {
            go_dead(why, to);
        }
    }
    std::vector<uint8_t> buf;
    try {
        buf.resize(1 << 20);
    } catch (const std::bad_alloc &) {
        buf.resize(1 << 12);
    }
    for (;;) {
        uint8_t cmd;
        uint64_t size;
        if (!client_recv_all(cfd, &cmd, 1) || !client_recv_all(cfd, &size, 8)) {
            break;                                   // ggml closed the connection
        }
        uint8_t head[16];
        uint8_t tail[8];
        memset(head, 0, sizeof(head));
        memset(tail, 0, sizeof(tail));
        if (!dead) {
            uint8_t hdr[9];
            hdr[0] = cmd;
            memcpy(hdr + 1, &size, 8);
            if (!up.send_all(hdr, 9, "sending a request")) {
                go_dead(up.why, up.timed_out);
            }
        }
        uint64_t left = size, pos = 0;
        bool client_gone = false;
        while (left > 0) {
            size_t k = client_recv_some(cfd, buf.data(), (size_t) std::min<uint64_t>(left, buf.size()));
            if (k == 0) {
                client_gone = true;
                break;
            }
            for (size_t i = 0; i < k && pos + i < sizeof(head); i++) {
                head[pos + i] = buf[i];
            }
            if (k >= 8) {
                memcpy(tail, buf.data() + k - 8, 8);
            } else {
                memmove(tail, tail + k, 8 - k);
                memcpy(tail + 8 - k, buf.data(), k);
            }
            if (cmd == CMD_HELLO) {
                memset(buf.data(), 0, k);            // no transport upgrade (e.g. RDMA): stay on this TCP path
            }
            if (!dead && !up.send_all(buf.data(), k, "sending a request")) {
                go_dead(up.why, up.timed_out);
            }
            left -= k;
            pos += k;
        }
        if (client_gone) {
            break;
        }
        int64_t rs = reply_size(cmd, tail, size);
        if (rs == NO_REPLY) {
            continue;
        }
        uint64_t sent = 0;
        if (!dead) {
            uint64_t usize = 0;
            if (!up.recv_all(&usize, 8, "waiting for a reply")) {
                go_dead(up.why, up.timed_out);
            } else if (usize != (uint64_t) rs) {
                go_dead("malformed reply (size " + std::to_string(usize) + " instead of " + std::to_string(rs) +
                        ") to command " + std::to_string(cmd), false);
            } else if (rs <= 64) {
                uint8_t small[64];
                if (!up.recv_all(small, (size_t) rs, "waiting for a reply")) {
                    go_dead(up.why, up.timed_out);
                } else if (cmd == CMD_HELLO &&
                           (small[0] != RPC_PROTO_MAJOR_VERSION || small[1] > RPC_PROTO_MINOR_VERSION)) {
                    go_dead("it speaks RPC protocol " + std::to_string(small[0]) + "." + std::to_string(small[1]) + "." +
                            std::to_string(small[2]) + ", this build of mtp_cy speaks " +
                            std::to_string(RPC_PROTO_MAJOR_VERSION) + "." + std::to_string(RPC_PROTO_MINOR_VERSION) +
                            "." + std::to_string(RPC_PROTO_PATCH_VERSION) + " (use the same llama.cpp version on both sides)",
                            false);
                } else {
                    if (cmd == CMD_HELLO) {
                        memset(small + 4, 0, CAPS_SIZE);
                    }
                    if (!client_send(cfd, &usize, 8) || !client_send(cfd, small, (size_t) rs)) {
                        break;
                    }
                    continue;
                }
            }
        }
        uint64_t rsize = (uint64_t) rs;              // what the server announced, or would have
        if (!client_send(cfd, &rsize, 8)) {
            break;
        }
        // forward the reply; once the server failed (before or during it), answer the rest ourselves
        while (sent < (uint64_t) rs) {
            size_t k = (size_t) std::min<uint64_t>((uint64_t) rs - sent, buf.size());
            if (!dead) {
                k = up.recv_some(buf.data(), k, "receiving a reply");
                if (k == 0) {
                    go_dead(up.why, up.timed_out);   // dead from now on: placeholders for the rest
                    continue;
                }
            } else {
                placeholder(cmd, head, buf.data(), k, sent);
            }
            if (!client_send(cfd, buf.data(), k)) {
                client_gone = true;
                break;
            }
            sent += k;
        }
        if (client_gone) {
            break;
        }
    }
    close(cfd);
    if (dead) {
        r->dead_open.fetch_sub(1);
    } else if (up.fd >= 0) {
        close(up.fd);                                // a clean disconnect: the server frees our buffers
        r->live.fetch_sub(1);
    }
    r->links.fetch_sub(1);
}

static void listener_main(relay * r) {
    for (;;) {
        int c = accept(r->lfd, nullptr, nullptr);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
            continue;
        }
        fcntl(c, F_SETFD, FD_CLOEXEC);
        try {
            std::thread(link_main, r, c).detach();
        } catch (...) {
            close(c);                    // no thread to serve it (resource exhaustion)
        }
    }
}

#endif  // MTP_CY_RPC_GUARD

// The relay of server host:port (created on first use; relays live as long as the process).
// Returns nullptr and sets `err` when no relay can be created.
static inline relay * get_relay(const std::string & host, int port, std::string & err) {
#if MTP_CY_RPC_GUARD
    static std::mutex mu;
    static std::map<std::string, relay *> relays;
    std::string key = host + ":" + std::to_string(port);
    std::lock_guard<std::mutex> lk(mu);
    auto it = relays.find(key);
    if (it != relays.end()) {
        return it->second;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        err = "cannot create a socket: " + errno_text(errno);
        return nullptr;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof(addr);
    if (bind(fd, (struct sockaddr *) &addr, sizeof(addr)) < 0 || listen(fd, 16) < 0 ||
        getsockname(fd, (struct sockaddr *) &addr, &len) < 0) {
        err = "cannot listen on 127.0.0.1: " + errno_text(errno);
        close(fd);
        return nullptr;
    }
    relay * r = new relay();
    r->host = host;
    r->port = port;
    r->endpoint = key;
    r->local = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
    r->lfd = fd;
    try {
        std::thread(listener_main, r).detach();
    } catch (const std::exception & e) {
        err = std::string("cannot start the connection guard's thread: ") + e.what();
        close(fd);
        delete r;
        return nullptr;
    }
    relays[key] = r;
    return r;
#else
    (void) host;
    (void) port;
    err = "RPC connections are not supported on this platform by mtp_cy";
    return nullptr;
#endif
}

// Check that the server answers upstream's HELLO within `timeout_us`, with a
// connection of its own (closed again).  "" when it does, else the reason.
// Skipped ("") while ggml holds a working connection to it: the server serves
// one client at a time, and ggml reuses that connection.
static inline std::string probe(relay * r, int64_t timeout_us, bool * timed_out) {
    *timed_out = false;
#if MTP_CY_RPC_GUARD
    if (r->live.load() > 0) {
        return "";
    }
    std::string why;
    bool to = false;
    int fd = connect_timeout(r->host, r->port, timeout_us, why, to);
    if (fd < 0) {
        *timed_out = to;
        return why;
    }
    relay tmp;                       // only for its deadline
    tmp.io_timeout_us.store(timeout_us > 0 ? timeout_us : 0);
    upstream up;
    up.r = &tmp;
    up.fd = fd;
    uint8_t req[9 + CAPS_SIZE];
    memset(req, 0, sizeof(req));
    req[0] = CMD_HELLO;
    uint64_t n = CAPS_SIZE;
    memcpy(req + 1, &n, 8);
    uint64_t size = 0;
    uint8_t rsp[4 + CAPS_SIZE];
    std::string out;
    if (!up.send_all(req, sizeof(req), "sending the handshake") ||
        !up.recv_all(&size, 8, "waiting for the handshake reply")) {
        *timed_out = up.timed_out;
        out = up.why;
        if (up.timed_out) {
            out += " (is it busy serving another client? an rpc-server serves one client at a time)";
        }
    } else if (size != sizeof(rsp)) {
        out = "it is not an rpc-server of llama.cpp's RPC protocol " + std::to_string(RPC_PROTO_MAJOR_VERSION) +
              " (handshake reply of " + std::to_string(size) + " bytes)";
    } else if (!up.recv_all(rsp, sizeof(rsp), "waiting for the handshake reply")) {
        *timed_out = up.timed_out;
        out = up.why;
    } else if (rsp[0] != RPC_PROTO_MAJOR_VERSION || rsp[1] > RPC_PROTO_MINOR_VERSION) {
        out = "it speaks RPC protocol " + std::to_string(rsp[0]) + "." + std::to_string(rsp[1]) + "." +
              std::to_string(rsp[2]) + ", this build of mtp_cy speaks " + std::to_string(RPC_PROTO_MAJOR_VERSION) + "." +
              std::to_string(RPC_PROTO_MINOR_VERSION) + "." + std::to_string(RPC_PROTO_PATCH_VERSION) +
              " (use the same llama.cpp version on both sides)";
    }
    close(fd);
    return out;
#else
    (void) r;
    (void) timeout_us;
    return "RPC connections are not supported on this platform by mtp_cy";
#endif
}

// The failure counters of the relays one model depends on, taken when it was loaded.
struct watch {
    std::vector<relay *> relays;
    std::vector<int64_t> base;

    void add(relay * r) {
        relays.push_back(r);
        base.push_back(r->failures.load());
    }
    void rebase() {
        for (size_t i = 0; i < relays.size(); i++) {
            base[i] = relays[i]->failures.load();
        }
    }
    // index of the first relay that failed since (or -1)
    int failed() const {
        for (size_t i = 0; i < relays.size(); i++) {
            if (relays[i]->failures.load() != base[i]) {
                return (int) i;
            }
        }
        return -1;
    }
    bool any_failed() const {
        return failed() >= 0;
    }
    void arm(int64_t timeout_us) {
        int64_t d = timeout_us > 0 ? now_us() + timeout_us : 0;
        for (relay * r : relays) {
            r->stream_deadline.store(d);
        }
    }
    void disarm() {
        for (relay * r : relays) {
            r->stream_deadline.store(-1);
        }
    }
};

// accessors for Cython
static inline int64_t relay_failures(relay * r) { return r->failures.load(); }
static inline int relay_live(relay * r) { return r->live.load(); }
static inline int relay_dead_open(relay * r) { return r->dead_open.load(); }
static inline int relay_links(relay * r) { return r->links.load(); }
static inline void relay_set_io_timeout(relay * r, int64_t us) { r->io_timeout_us.store(us); }
static inline std::string relay_local(relay * r) { return r->local; }
static inline std::string relay_endpoint(relay * r) { return r->endpoint; }
static inline std::string relay_error(relay * r, bool * timeout) { return r->last_error(timeout); }
static inline bool guard_supported() { return MTP_CY_RPC_GUARD != 0; }

// ggml's RPC entry points, through the registry (works with static and dynamically loaded backends)
typedef ggml_backend_reg_t (*add_server_fn)(const char * endpoint);
typedef void (*start_server_fn)(const char * endpoint, const char * cache_dir, size_t n_threads,
                                size_t n_devices, ggml_backend_dev_t * devices);

static inline ggml_backend_reg_t rpc_reg() {
    return ggml_backend_reg_by_name("RPC");
}

static inline add_server_fn get_add_server() {
    ggml_backend_reg_t reg = rpc_reg();
    return reg ? (add_server_fn) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server") : nullptr;
}

static inline start_server_fn get_start_server() {
    ggml_backend_reg_t reg = rpc_reg();
    return reg ? (start_server_fn) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_start_server") : nullptr;
}

static inline ggml_backend_reg_t add_server(const std::string & endpoint) {
    add_server_fn f = get_add_server();
    return f ? f(endpoint.c_str()) : nullptr;
}

static inline bool start_server(const std::string & endpoint, const char * cache_dir, size_t n_threads,
                                std::vector<ggml_backend_dev_t> & devices) {
    start_server_fn f = get_start_server();
    if (!f) {
        return false;
    }
    f(endpoint.c_str(), cache_dir, n_threads, devices.size(), devices.data());
    return true;
}

}  // namespace mtp_cy_rpc
