# Backend initialisation, devices and system information.

from mtp_cy._version import LLAMA_CPP_COMMIT as _LLAMA_CPP_COMMIT

cdef bint _initialized = False
cdef object _init_lock = threading.Lock()


def init():
    """Initialise llama.cpp's backends (idempotent, thread-safe).

    Importing mtp_cy does not need it: :class:`Model` calls it on first use.
    Returns ``None``.
    """
    global _initialized
    if _initialized:
        return
    with _init_lock:
        if not _initialized:
            with nogil:
                llama_backend_init()
                ggml_time_init()
            _initialized = True


def system_info():
    """Return ggml's feature string for this build (e.g. ``"CPU : SSE3 = 1 | AVX2 = 1 | ..."``)."""
    init()
    return (<bytes>llama_print_system_info()).decode("utf-8", "replace").strip()


_DEV_TYPES = {
    GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
    GGML_BACKEND_DEVICE_TYPE_META: "meta",
}


cdef list _local_devices():
    cdef size_t i, n = ggml_backend_dev_count()
    cdef size_t mfree = 0, mtotal = 0
    cdef ggml_backend_dev_t dev
    out = []
    for i in range(n):
        dev = ggml_backend_dev_get(i)
        ggml_backend_dev_memory(dev, &mfree, &mtotal)
        out.append({
            "name": (<bytes>ggml_backend_dev_name(dev)).decode("utf-8", "replace"),
            "description": (<bytes>ggml_backend_dev_description(dev)).decode("utf-8", "replace"),
            "type": _DEV_TYPES.get(<int>ggml_backend_dev_type(dev), "unknown"),
            "backend": (<bytes>ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev))).decode("utf-8", "replace"),
            "memory_free": mfree,
            "memory_total": mtotal,
        })
    return out


def devices(rpc_servers=None, *, timeout=5.0):
    """List the backend devices llama.cpp can use.

    Returns a list of dicts with keys ``name``, ``description``, ``type``
    (``"cpu"``, ``"gpu"``, ``"igpu"``, ``"accel"``), ``backend`` (the registry
    name, e.g. ``"CPU"``, ``"CUDA"``, ``"RPC"``), ``memory_free`` and
    ``memory_total`` (bytes).

    This machine's devices come first, then the devices of the RPC servers
    used so far by this process (``Model(rpc_servers=...)``) and of
    ``rpc_servers`` (a list of ``"host:port"``, connected now), with two more
    keys: ``endpoint`` (the server) and ``available`` (``False`` when the
    server does not answer within ``timeout`` seconds, or its connection
    failed; its memory is then reported as 0).  An endpoint given in
    ``rpc_servers`` that does not answer raises :class:`RPCError`.
    """
    init()
    out = _local_devices()
    if rpc_servers is not None or _rpc_known:
        out += _rpc_devices(rpc_servers, timeout)
    return out


llama_cpp_commit = _LLAMA_CPP_COMMIT
