# ggml's RPC backend: models split across hosts (Model(rpc_servers=...)), the RPC
# devices in devices(), and upstream's RPC server (rpc_server()).  ggml's RPC client
# reports a failing server instead of aborting the process and bounds its waits
# (vendor/patches/0004); mtp_cy reads those reports (_rpc.h) after every load, context
# creation and step and raises RPCError / GenerationTimeout naming the server.

cimport mtp_cy.includes.rpc as rpc

import socket as _socket

cdef object _rpc_lock = threading.Lock()
cdef dict _rpc_known = {}        # "ip:port" -> reg address: servers registered so far
DEFAULT_RPC_PORT = 50052


def _rpc_connections(ep):
    """``(open, working, failed_open)`` connections of this process to server ``ep``
    (``"ip:port"``): ggml's connections open now, those working, and failed ones still held
    by a model that was not closed yet; ``None`` when mtp_cy never connected to it (for
    tests and diagnostics)."""
    with _rpc_lock:
        if ep not in _rpc_known:
            return None
    cdef rpc.state st = rpc.endpoint_state(ep.encode())
    return (st.live + st.failed_open, st.live, st.failed_open)


def _rpc_available():
    """``True`` when this build has ggml's RPC backend with mtp_cy's failure reporting
    (vendor/patches/0004)."""
    init()
    return rpc.rpc_reg() != NULL and rpc.guard_supported()


cdef str _rpc_error(str ep, bint * timed_out):
    """Why the last connection to ``ep`` failed (``*timed_out``: it stopped answering)."""
    cdef rpc.state st = rpc.endpoint_state(ep.encode())
    timed_out[0] = st.timed_out
    return st.error.decode("utf-8", "replace") or f"RPC server {ep}: the connection failed"


cdef tuple _parse_endpoint(ep):
    """``"host:port"`` -> (IPv4 address, port, ``"ip:port"``); ValueError/TypeError for bad input,
    RPCError when the host name does not resolve."""
    if not isinstance(ep, str):
        raise TypeError(f"RPC endpoints must be 'host:port' strings, got {type(ep).__name__}")
    s = (<str>ep).strip()
    if s.startswith("[") or s.count(":") > 1:
        raise ValueError(f"RPC endpoint {ep!r}: IPv6 addresses are not supported by llama.cpp's RPC transport "
                         "(use an IPv4 address or a host name)")
    host, sep, port_s = s.rpartition(":")
    if not sep or not host or not port_s:
        raise ValueError(f"RPC endpoint {ep!r} must be 'host:port', e.g. '192.168.1.10:{DEFAULT_RPC_PORT}'")
    try:
        port = int(port_s, 10)
    except ValueError:
        raise ValueError(f"RPC endpoint {ep!r}: the port must be a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"RPC endpoint {ep!r}: the port must be in 1..65535")
    try:
        ip = _socket.gethostbyname(host)
    except (OSError, UnicodeError) as exc:
        raise RPCError(f"RPC server {s}: cannot resolve host {host!r}: {exc}", endpoint=s) from None
    return ip, port, f"{ip}:{port}"


cdef list _parse_endpoints(servers):
    if isinstance(servers, str):
        servers = servers.split(",")
    try:
        items = list(servers)
    except TypeError:
        raise TypeError(f"rpc_servers must be a list of 'host:port' strings, got {type(servers).__name__}") from None
    if not items:
        raise ValueError("rpc_servers is empty; pass None to use only this machine's devices")
    out = []
    seen = set()
    for ep in items:
        t = _parse_endpoint(ep)
        if t[2] in seen:
            raise ValueError(f"RPC endpoint {ep!r} is listed twice")
        seen.add(t[2])
        out.append(t)
    return out


cdef int64_t _timeout_us(timeout, str name) except -2:
    """Seconds (> 0 and at most 1e9, or None / inf for no limit) -> microseconds (0 = no limit).

    A positive timeout shorter than a microsecond is one microsecond (never "no limit")."""
    if timeout is None:
        return 0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(timeout).__name__}")
    try:
        t = float(timeout)
    except OverflowError:
        raise ValueError(f"{name} must be in (0, 1e9] seconds, or None / inf for no limit, "
                         f"got {timeout!r}") from None
    if t == float("inf"):
        return 0
    if t != t or t <= 0 or t > 1e9:
        raise ValueError(f"{name} must be in (0, 1e9] seconds, or None / inf for no limit, got {timeout!r}")
    return max(1, <int64_t>(t * 1e6))


cdef int _require_rpc() except -1:
    init()
    if rpc.rpc_reg() == NULL:
        raise MTPError("this build of mtp_cy has no RPC backend (it was built with GGML_RPC=OFF); "
                       "rebuild without -DGGML_RPC=OFF in CMAKE_ARGS")
    if not rpc.guard_supported():
        raise MTPError("this build's RPC backend lacks mtp_cy's failure reporting (vendor/patches/0004: "
                       "a llama.cpp tree given with MTP_CY_LLAMA_CPP_DIR must have vendor/patches applied); "
                       "without it a failing server would abort the process")
    return 0


cdef ggml_backend_reg_t _rpc_connect(str ip, int port, str ep, int64_t timeout_us) except NULL:
    """Connect to the server at ``ep`` (every wait bounded by ``timeout_us``) and register its
    devices with ggml.  Raises RPCError naming the server."""
    cdef ggml_backend_reg_t reg
    cdef string bep = ep.encode()
    cdef rpc.state st = rpc.endpoint_state(bep)
    cdef int64_t base = st.failures
    cdef bint to = False
    if st.failed_open > 0:
        # ggml shares one connection per server: a new model would get the failed one
        raise RPCError(f"RPC server {ep}: the connection of a model loaded earlier failed "
                       f"({_rpc_error(ep, &to)}) and that model is still open; llama.cpp would reuse its "
                       "connection: close that model and its sessions first", endpoint=ep)
    rpc.set_timeout(timeout_us)
    with nogil:
        reg = rpc.add_server(bep)
    with _rpc_lock:
        _rpc_known.setdefault(ep, 0)
    if rpc.failures(bep) != base:
        msg = _rpc_error(ep, &to)
        raise RPCError(f"{msg}", endpoint=ep)
    if reg == NULL:
        raise RPCError(f"RPC server {ep} reported no devices", endpoint=ep)
    with _rpc_lock:
        _rpc_known[ep] = <size_t>reg
    return reg


cdef dict _rpc_device_dict(ggml_backend_dev_t dev, str ep, bint query):
    cdef size_t mfree = 0, mtotal = 0
    if query:
        with nogil:
            ggml_backend_dev_memory(dev, &mfree, &mtotal)
    return {
        "name": (<bytes>ggml_backend_dev_name(dev)).decode("utf-8", "replace"),
        "description": f"RPC server {ep}",
        "type": _DEV_TYPES.get(<int>ggml_backend_dev_type(dev), "unknown"),
        "backend": "RPC",
        "memory_free": mfree,
        "memory_total": mtotal,
        "endpoint": ep,
        "available": query,
    }


cdef list _rpc_devices(rpc_servers, timeout):
    """The devices of the servers registered so far (and of ``rpc_servers``, registered now)."""
    cdef int64_t tus = _timeout_us(timeout, "timeout")
    cdef ggml_backend_reg_t reg
    cdef size_t i, n
    cdef int64_t base
    cdef bint ok
    cdef string bep
    if rpc_servers is not None:
        _require_rpc()
        for ip, port, ep in _parse_endpoints(rpc_servers):
            _rpc_connect(ip, port, ep, tus)
    with _rpc_lock:
        known = [(ep, r) for ep, r in _rpc_known.items() if r]
    out = []
    rpc.set_timeout(tus)
    for ep, regaddr in known:
        reg = <ggml_backend_reg_t><size_t>regaddr
        bep = ep.encode()
        ok = True
        n = ggml_backend_reg_dev_count(reg)
        for i in range(n):
            base = rpc.failures(bep)
            d = _rpc_device_dict(ggml_backend_reg_dev_get(reg, i), ep, ok)
            if ok and rpc.failures(bep) != base:
                ok = False
                d["memory_free"] = d["memory_total"] = 0
                d["available"] = False
            out.append(d)
    return out


cdef vector[ggml_backend_dev_t] _local_gpus():
    """This machine's GPUs as llama.cpp's default device selection picks them (llama.cpp's
    llama_prepare_model_devices): discrete GPUs (one per device id), else integrated ones."""
    cdef vector[ggml_backend_dev_t] gpus, igpus
    cdef size_t i, j, n = ggml_backend_dev_count()
    cdef ggml_backend_dev_t dev
    cdef ggml_backend_dev_props p, q
    cdef bint dup
    for i in range(n):
        dev = ggml_backend_dev_get(i)
        t = ggml_backend_dev_type(dev)
        if t == GGML_BACKEND_DEVICE_TYPE_GPU:
            if (<bytes>ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev))) == b"RPC":
                continue
            ggml_backend_dev_get_props(dev, &p)
            dup = False
            for j in range(gpus.size()):
                ggml_backend_dev_get_props(gpus[j], &q)
                if p.device_id != NULL and q.device_id != NULL and (<bytes>p.device_id) == (<bytes>q.device_id):
                    dup = True
            if not dup:
                gpus.push_back(dev)
        elif t == GGML_BACKEND_DEVICE_TYPE_IGPU:
            if igpus.size() == 0 or ggml_backend_dev_backend_reg(dev) == ggml_backend_dev_backend_reg(igpus.back()):
                igpus.push_back(dev)
    if gpus.size() == 0:
        return igpus
    return gpus


def rpc_server(host="127.0.0.1", port=DEFAULT_RPC_PORT, *, threads=None, cache_dir=None, devices=None):
    """Serve this machine's devices to other hosts with llama.cpp's RPC server (blocks).

    This is upstream's own server (``ggml_backend_rpc_start_server``, what
    llama.cpp's ``rpc-server`` program runs), so any llama.cpp RPC client of the
    same protocol version -- ``mtp_cy.Model(path, rpc_servers=[...])`` on
    another machine, or llama.cpp's ``--rpc`` -- can place model layers on this
    machine's devices.  ``python -m mtp_cy rpc-server`` runs it from the command
    line and stops it on Ctrl-C / SIGTERM.

    * ``host``: IPv4 address to listen on (default loopback only).  **The
      protocol has no authentication or encryption**: whoever can reach the
      port can allocate memory and run computations here.  Bind to another
      address only on a trusted private network.
    * ``port``: TCP port (default 50052).
    * ``threads``: CPU threads of the CPU device (default: half the cores).
    * ``cache_dir``: directory where the server caches large tensors it
      received (by hash), so that a client loading the same model again skips
      sending them (upstream's ``rpc-server -c``); ``None`` disables the cache.
    * ``devices``: names of the devices to serve (see :func:`devices`);
      default as upstream: every GPU / accelerator-class device, or the CPU
      when there is none.

    The calling thread blocks (with the GIL released) for as long as the
    server runs: upstream's server has no stop function, so run it in a
    process of its own and stop that process.  Raises ``ValueError`` /
    ``TypeError`` for bad arguments, ``OSError`` when the address cannot be
    bound (e.g. the port is taken), :class:`RPCError` when the server stops.
    """
    _require_rpc()
    if not isinstance(host, str) or not host:
        raise TypeError("host must be a non-empty str (an IPv4 address)")
    try:
        ip = _socket.gethostbyname(host)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc}") from None
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an int in 1..65535, got {port!r}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 2) // 2)
    threads = _as_int("threads", threads, 1, 4096)
    cdef bytes bcache = None
    cdef const char * ccache = NULL
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        bcache = os.path.abspath(cache_dir).encode()
        ccache = bcache
    cdef vector[ggml_backend_dev_t] devs
    cdef ggml_backend_dev_t dev
    cdef size_t i
    if devices is not None:
        if isinstance(devices, str):
            devices = [d for d in devices.split(",") if d]
        for name in devices:
            if not isinstance(name, str):
                raise TypeError(f"device names must be str, got {type(name).__name__}")
            dev = ggml_backend_dev_by_name(name.encode())
            if dev == NULL:
                raise ValueError(f"unknown device {name!r}; available: "
                                 f"{', '.join(d['name'] for d in _local_devices())}")
            devs.push_back(dev)
        if devs.size() == 0:
            raise ValueError("devices is empty")
    else:
        for i in range(ggml_backend_dev_count()):
            dev = ggml_backend_dev_get(i)
            if ggml_backend_dev_type(dev) not in (GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_ACCEL):
                devs.push_back(dev)
        if devs.size() == 0:
            for i in range(ggml_backend_dev_count()):
                dev = ggml_backend_dev_get(i)
                if ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU:
                    devs.push_back(dev)
                    break
    if devs.size() == 0:
        raise MTPError("no device to serve")
    # upstream reports a bind failure only as "Failed to create server socket": check first
    probe_sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        probe_sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        probe_sock.bind((ip, port))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {ip}:{port}: {exc.strerror}") from None
    finally:
        probe_sock.close()
    cdef string endpoint = f"{ip}:{port}".encode()
    cdef size_t nthreads = threads
    cdef cbool started
    _take_errors()
    with nogil:
        started = rpc.start_server(endpoint, ccache, nthreads, devs)
    if not started:
        raise MTPError("this build's RPC backend has no ggml_backend_rpc_start_server")
    raise RPCError(f"the RPC server on {ip}:{port} stopped: {_take_errors() or 'see its output'}",
                   endpoint=f"{ip}:{port}")
