# Model: a loaded GGUF file.

cdef struct _ProgressCtx:
    void * fn          # borrowed PyObject* (kept alive by the caller's frame)
    void * err_holder  # borrowed PyObject* (a list receiving an exception)
    int bar            # draw a text progress bar on stderr
    int last_pct


cdef cbool _progress_cb(float progress, void * user_data) noexcept with gil:
    cdef _ProgressCtx * pc = <_ProgressCtx *> user_data
    cdef int pct
    try:
        if pc.bar:
            import sys
            pct = <int>(progress * 100)
            if pct != pc.last_pct:
                pc.last_pct = pct
                n = pct // 4
                sys.stderr.write("\rloading model [%s%s] %3d%%" % ("#" * n, "." * (25 - n), pct))
                if pct >= 100:
                    sys.stderr.write("\n")
                sys.stderr.flush()
            return True
        res = (<object>pc.fn)(float(progress))
        return res is None or bool(res)
    except BaseException as exc:
        (<list>pc.err_holder).append(exc)
        return False


cdef str _watch_error(rpc.watch * w, bint * timed_out=NULL):
    """Why the first failed server of ``w`` failed (``*timed_out``: it stopped answering)."""
    cdef bint to = False
    cdef int i = w.failed()
    if i < 0:
        return "no error"
    msg = _rpc_error(w.endpoints[i].decode(), &to)
    if timed_out != NULL:
        timed_out[0] = to
    return msg


_SPLIT_MODES = {"none": LLAMA_SPLIT_MODE_NONE, "layer": LLAMA_SPLIT_MODE_LAYER,
                "row": LLAMA_SPLIT_MODE_ROW, "tensor": LLAMA_SPLIT_MODE_TENSOR}


cdef str _model_arch(const llama_model * m):
    cdef char buf[128]
    cdef int32_t n = llama_model_meta_val_str(m, b"general.architecture", buf, sizeof(buf))
    return buf[:max(n, 0)].decode("utf-8", "replace") if n >= 0 else None


cdef object _head_mismatch(const llama_model * model, const llama_model * head):
    """Why ``head`` cannot draft for ``model`` (None when it fits)."""
    cdef str a = _model_arch(model), b = _model_arch(head)
    if llama_model_n_layer_nextn(head) <= 0:
        return (f"it has no MTP (NextN) layer (architecture {b!r}, nextn_predict_layers = 0): it is not an "
                f"MTP head, e.g. a plain model was given as mtp_head")
    if a != b:
        return f"it is a {b!r} model, the model is {a!r}"
    if llama_model_n_embd(head) != llama_model_n_embd(model):
        return f"its width is {llama_model_n_embd(head)}, the model's is {llama_model_n_embd(model)}"
    cdef int nv_h = llama_vocab_n_tokens(llama_model_get_vocab(head))
    cdef int nv_m = llama_vocab_n_tokens(llama_model_get_vocab(model))
    if nv_h != nv_m:
        return f"its vocabulary has {nv_h} tokens, the model's has {nv_m}"
    cdef int trunk_h = llama_model_n_layer(head), trunk_m = llama_model_n_layer(model)
    if trunk_h != trunk_m:
        return f"it was made for a trunk of {trunk_h} layers, the model has {trunk_m}"
    return None


cdef object _gguf_u32(gguf_context * g, str key):
    cdef int64_t k = gguf_find_key(g, key.encode())
    if k >= 0 and gguf_get_kv_type(g, k) == GGUF_TYPE_UINT32:
        return gguf_get_val_u32(g, k)
    return None


# tensor-name parts (after "blk.N.") that mark a layer's kind, as llama.cpp's loaders name them:
# attention layers (K projections of plain, fused-free and MLA attention) and recurrent layers
# (Mamba / Gated-DeltaNet / KDA state-space mixers, LFM2's short convolutions, RWKV's time mix)
_ATTN_PARTS = ("attn_k.", "attn_q.", "attn_k_b.", "attn_kv_a_mqa.", "attn_q_a.")
_RECR_PARTS = ("ssm_", "shortconv", "time_mix")


cdef dict _gguf_layout(str path):
    """What a GGUF file holds, read from its header alone (no weights): ``arch``, ``n_block``
    (block_count), ``nextn`` (NextN / MTP layers among them) and, per block index, whether it
    has tensors at all, attention tensors and recurrent (state-space) tensors."""
    cdef bytes bpath = path.encode()
    cdef const char * cpath = bpath
    cdef gguf_init_params gp
    gp.no_alloc = True
    gp.ctx = NULL
    cdef gguf_context * g
    cdef int64_t i, n
    with nogil:
        g = gguf_init_from_file(cpath, gp)
    if g == NULL:
        raise ModelLoadError(f"cannot read the GGUF header of {path!r}: {_take_errors() or 'corrupt file'}")
    arch = None
    blocks = {}
    try:
        i = gguf_find_key(g, b"general.architecture")
        if i >= 0 and gguf_get_kv_type(g, i) == GGUF_TYPE_STRING:
            arch = (<bytes>gguf_get_val_str(g, i)).decode("utf-8", "replace")
        n_block = _gguf_u32(g, f"{arch}.block_count") if arch else None
        nextn = (_gguf_u32(g, f"{arch}.nextn_predict_layers") if arch else None) or 0
        n = gguf_get_n_tensors(g)
        for i in range(n):
            name = (<bytes>gguf_get_tensor_name(g, i)).decode("utf-8", "replace")
            if not name.startswith("blk."):
                continue
            idx, _, rest = name[4:].partition(".")
            if not idx.isdigit():
                continue
            b = blocks.setdefault(int(idx), [False, False])
            if rest.startswith(_ATTN_PARTS):
                b[0] = True
            if rest.startswith(_RECR_PARTS):
                b[1] = True
    finally:
        gguf_free(g)
    return {"arch": arch, "n_block": n_block, "nextn": nextn, "blocks": blocks}


cdef int _check_runnable(str path, dict lay, const llama_model * m) except -1:
    """Refuse a file that llama.cpp loads but cannot run (it would abort the process on the
    first decode): an MTP-head-only file (a sidecar) opened as the model, and a hybrid model
    whose layer pattern leaves one of its two memories (attention KV cache, recurrent state)
    without a layer."""
    arch, n_block, nextn, blocks = lay["arch"], lay["n_block"], lay["nextn"], lay["blocks"]
    if not n_block:
        return 0
    n_trunk = n_block - nextn
    trunk = [blocks.get(i) for i in range(n_trunk)]
    if nextn > 0 and n_trunk > 0 and all(b is None for b in trunk):
        raise ModelLoadError(
            f"{path!r} holds only an MTP head ({nextn} NextN layer(s), none of its {n_trunk} trunk layers): "
            f"it is an MTP sidecar, not a model. Load the model it belongs to and pass this file as "
            f"mtp_head=, e.g. mtp_cy.Model('model.gguf', mtp_head={path!r})")
    if m != NULL and llama_model_is_hybrid(m) and n_trunk > 0:
        n_attn = sum(1 for b in trunk if b is not None and b[0])
        n_recr = sum(1 for b in trunk if b is not None and b[1])
        if n_attn == 0 or n_recr == 0:
            have, lack = (("recurrent", "attention") if n_attn == 0 else ("attention", "recurrent"))
            raise ModelLoadError(
                f"{path!r} is a hybrid {arch!r} model whose {n_trunk} trunk layers are all {have} layers "
                f"(no {lack} layer): llama.cpp loads such a file but aborts on its first decode (its {lack} "
                f"memory would be empty). The file's layer pattern is wrong for this architecture "
                f"(e.g. {arch}.full_attention_interval); export it again with both kinds of layer")
    return 0


cdef _check_gguf_file(str path):
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path!r}")
    if os.path.isdir(path):
        raise ModelLoadError(f"model path is a directory, not a GGUF file: {path!r}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path!r}: {exc}") from None
    if len(head) == 0:
        raise ModelLoadError(f"model file is empty: {path!r}")
    if head[:4] != b"GGUF":
        raise ModelLoadError(f"not a GGUF file (bad magic {head[:4]!r}): {path!r}")


# tests compare guarded and unguarded renderings of well-behaved templates
_TEMPLATE_GUARD = True


cdef class Model:
    """A GGUF model loaded with llama.cpp.

    ``Model(path, *, n_gpu_layers=-1, use_mmap=True, use_mlock=False,
    load_mtp=None, main_gpu=0, split_mode="layer", tensor_split=None,
    vocab_only=False, progress=None, rpc_servers=None, rpc_timeout=30.0)``

    * ``n_gpu_layers``: layers to offload to the GPU, ``-1`` means all.
    * ``load_mtp``: ``None`` loads the MTP (NextN) layers when the GGUF has
      them, ``True``/``False`` force it.
    * ``split_mode``: ``"none"``, ``"layer"``, ``"row"`` or ``"tensor"``.
    * ``tensor_split``: per-device proportions (at most ``llama_max_devices``).
    * ``progress``: ``None``, ``True`` (a progress bar on stderr) or a callable
      receiving a float in [0, 1]; returning ``False`` cancels loading.
    * ``rpc_servers``: a list of ``"host:port"`` endpoints of llama.cpp RPC
      servers (``python -m mtp_cy rpc-server`` on the other machines).  Their
      devices come first in the device list, then this machine's GPUs, exactly
      as with upstream's ``--rpc``, so ``n_gpu_layers`` / ``split_mode`` /
      ``tensor_split`` (one entry per device, servers first) / ``main_gpu``
      place the layers on them; layers not offloaded stay on this machine's CPU.
      Every server must answer before anything is loaded; one that does not
      raises :class:`ModelLoadError` naming it.
    * ``mtp_head``: path of an MTP sidecar GGUF (upstream's ``mtp-<name>.gguf``: the
      NextN block, with the embedding/norm/output tensors it needs) for a model file
      without MTP layers, e.g. a plain quant; :class:`MTP` then drafts with it.
      The head must fit the model (same architecture, width, vocabulary size and
      trunk depth, at least one NextN layer): otherwise
      :class:`MTPUnsupportedError` says why.  :attr:`mtp_source` and
      :attr:`mtp_head` tell where the head came from.
    * ``rpc_timeout``: seconds to wait for a server to accept the connection
      and to answer each request while connecting, loading and freeing
      (``None`` = no limit).  While a stream runs, its own ``timeout`` applies.
      A server that fails while the model is in use makes the current stream
      raise :class:`RPCError` (:class:`GenerationTimeout` if it stopped
      answering within the stream's ``timeout``); the model is then unusable
      -- its layers on that server are gone -- and must be loaded again.

    Raises :class:`ModelLoadError` when the file cannot be loaded.  ``close()``
    is idempotent; the model is also a context manager and is freed on garbage
    collection.  Sessions keep their model alive: the weights are released
    only when the model and every session on it are closed.
    """
    cdef llama_model * _model
    cdef const llama_vocab * _vocab
    cdef readonly str path
    cdef bint _closed
    cdef int _users
    cdef bint _mtp_loaded
    cdef bint _vocab_only
    cdef llama_model * _head                    # an MTP sidecar (mtp_head=...), or NULL
    cdef str _head_path
    cdef dict _meta_cache
    cdef common_chat_templates * _chat_tmpls   # the GGUF's own template, parsed on first use
    cdef common_chat_templates * _chat_tmpls_tools   # its separate tool_use template, if any
    cdef object _chat_lock
    cdef rpc.watch * _rpcw                     # the RPC servers this model depends on (NULL: none)
    cdef int64_t _rpc_tus                       # rpc_timeout: the bound of every wait for them
    cdef readonly tuple rpc_servers
    cdef str _rpc_error                         # set once a server failed: the model is unusable
    cdef object __weakref__

    def __cinit__(self):
        self._model = NULL
        self._head = NULL
        self._head_path = None
        self._vocab = NULL
        self._closed = True
        self._users = 0
        self._chat_tmpls = NULL
        self._chat_tmpls_tools = NULL
        self._chat_lock = threading.Lock()
        self._rpcw = NULL
        self.rpc_servers = ()
        self._rpc_error = None

    def __init__(self, path, *, n_gpu_layers=-1, use_mmap=True, use_mlock=False, load_mtp=None,
                 main_gpu=0, split_mode="layer", tensor_split=None, vocab_only=False, progress=None,
                 rpc_servers=None, rpc_timeout=30.0, mtp_head=None):
        if self._model != NULL:
            raise MTPError("Model.__init__ called twice")
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = path.decode()
        if not isinstance(n_gpu_layers, int):
            raise TypeError("n_gpu_layers must be an int (-1 for all layers)")
        if not isinstance(main_gpu, int) or main_gpu < 0:
            raise ValueError(f"main_gpu must be an int >= 0, got {main_gpu!r}")
        if isinstance(split_mode, str):
            if split_mode not in _SPLIT_MODES:
                raise ValueError(f"split_mode must be one of {sorted(_SPLIT_MODES)}, got {split_mode!r}")
            sm = _SPLIT_MODES[split_mode]
        else:
            raise TypeError(f"split_mode must be a str, got {type(split_mode).__name__}")
        if load_mtp is not None and not isinstance(load_mtp, bool):
            raise TypeError("load_mtp must be None, True or False")
        head_path = None
        if mtp_head is not None:
            head_path = os.fspath(mtp_head)
            if isinstance(head_path, bytes):
                head_path = head_path.decode()
            if vocab_only:
                raise ValueError("mtp_head cannot be used with vocab_only=True (nothing would run the head)")
            if load_mtp is False:
                raise ValueError("mtp_head=... loads an MTP head; it contradicts load_mtp=False")
        if progress is not None and progress is not True and progress is not False and not callable(progress):
            raise TypeError("progress must be None, True or a callable taking a float in [0, 1]")
        cdef int64_t rpc_tus = _timeout_us(rpc_timeout, "rpc_timeout")
        try:
            endpoints = None if rpc_servers is None else _parse_endpoints(rpc_servers)
        except RPCError as exc:
            raise ModelLoadError(str(exc)) from exc
        init()
        cdef size_t max_dev = llama_max_devices()
        cdef vector[float] ts
        if tensor_split is not None:
            vals = [float(x) for x in tensor_split]
            if len(vals) > <Py_ssize_t>max_dev:
                raise ValueError(f"tensor_split has {len(vals)} entries; this build supports at most {max_dev}")
            if any(v < 0 for v in vals) or not any(v > 0 for v in vals):
                raise ValueError("tensor_split entries must be >= 0 with at least one > 0")
            ts.resize(max_dev, 0.0)
            for i, v in enumerate(vals):
                ts[i] = v
        _check_gguf_file(path)
        lay = _gguf_layout(path)
        if not vocab_only:
            _check_runnable(path, lay, NULL)     # a sidecar is refused before loading anything

        cdef llama_model_params mp = llama_model_default_params()
        cdef vector[ggml_backend_dev_t] devs
        cdef vector[ggml_backend_dev_t] gpus
        cdef vector[ggml_backend_dev_t] first_devs    # one device per RPC server
        cdef size_t mfree = 0, mtotal = 0
        cdef ggml_backend_reg_t reg
        cdef size_t di
        cdef rpc.watch * w = NULL
        if endpoints is not None:
            try:
                _require_rpc()
            except MTPError as exc:
                raise ModelLoadError(str(exc)) from None
            w = new rpc.watch()
            try:
                for ip, port, ep in endpoints:
                    w.add(ep.encode())
                    reg = _rpc_connect(ip, port, ep, rpc_tus)
                    if ggml_backend_reg_dev_count(reg) > 0:
                        first_devs.push_back(ggml_backend_reg_dev_get(reg, 0))
                    for di in range(ggml_backend_reg_dev_count(reg)):
                        devs.push_back(ggml_backend_reg_dev_get(reg, di))
            except RPCError as exc:
                del w
                raise ModelLoadError(f"failed to load model {path!r}: {exc}") from exc
            except BaseException:
                del w
                raise
            gpus = _local_gpus()
            for di in range(gpus.size()):
                devs.push_back(gpus[di])
            devs.push_back(NULL)
            mp.devices = devs.data()
        mp.n_gpu_layers = n_gpu_layers
        mp.main_gpu = main_gpu
        mp.split_mode = sm
        if use_mmap and use_mlock:
            mp.load_mode = LLAMA_LOAD_MODE_MMAP_MLOCK
        elif use_mmap:
            mp.load_mode = LLAMA_LOAD_MODE_MMAP
        elif use_mlock:
            mp.load_mode = LLAMA_LOAD_MODE_MLOCK
        else:
            mp.load_mode = LLAMA_LOAD_MODE_NONE
        mp.vocab_only = bool(vocab_only)
        mp.load_mtp = True if load_mtp is None else bool(load_mtp)
        if ts.size() > 0:
            mp.tensor_split = ts.data()
        cdef _ProgressCtx pc
        errs = []
        pc.fn = <void *>progress
        pc.err_holder = <void *>errs
        pc.bar = progress is True
        pc.last_pct = -1
        if progress is not None and progress is not False:
            mp.progress_callback = _progress_cb
            mp.progress_callback_user_data = &pc
        cdef bytes bpath = path.encode()
        cdef const char * cpath = bpath
        cdef llama_model * m
        _take_errors()
        with nogil:
            m = llama_model_load_from_file(cpath, mp)
            if m != NULL:
                # a request with a reply on every server's connection: the server answers only
                # after it has processed everything sent before (the weights), and a connection
                # that broke while they were sent (they have no replies) shows up now
                for di in range(first_devs.size()):
                    ggml_backend_dev_memory(first_devs[di], &mfree, &mtotal)
        if w != NULL and w.any_failed():
            # a server failed while loading: what was loaded is not usable
            msg = _watch_error(w)
            if m != NULL:
                with nogil:
                    llama_model_free(m)
            del w
            raise ModelLoadError(f"failed to load model {path!r}: {msg}")
        if m == NULL:
            if w != NULL:
                del w
            if errs:
                raise ModelLoadError(f"loading {path!r} was interrupted by the progress callback") from errs[0]
            if progress is not None and progress is not True and progress is not False:
                detail = _take_errors()
                if "cancel" in detail.lower() or not detail:
                    raise ModelLoadError(f"loading {path!r} was cancelled by the progress callback")
                raise ModelLoadError(f"failed to load model {path!r}: {detail}")
            raise ModelLoadError(f"failed to load model {path!r}: {_take_errors() or 'unknown error'}")
        if not vocab_only:
            try:
                _check_runnable(path, lay, m)
            except BaseException:
                with nogil:
                    llama_model_free(m)
                if w != NULL:
                    del w
                raise
        self._model = m
        self._vocab = llama_model_get_vocab(m)
        self.path = path
        self._closed = False
        self._meta_cache = None
        self._vocab_only = bool(vocab_only)
        self._mtp_loaded = mp.load_mtp and llama_model_n_layer_nextn(m) > 0 and not vocab_only
        if w != NULL:
            self._rpcw = w
            self._rpc_tus = rpc_tus
            self.rpc_servers = tuple(ep for _, _, ep in endpoints)
        if head_path is not None:
            try:
                self._load_head(head_path, mp)
            except BaseException:
                self._closed = True
                self._free()
                raise

    cdef int _rpc_guard(self) except -1:
        """Refuse to run anything on a model whose RPC server failed."""
        if self._rpc_error is not None:
            raise RPCError(f"{self._rpc_error}; this model cannot be used any more (its layers on that server are "
                           f"gone): close it and load it again", endpoint=self._rpc_failed_endpoint())
        return 0

    cdef str _rpc_failed_endpoint(self):
        cdef int i
        if self._rpcw == NULL:
            return None
        i = self._rpcw.failed()
        return self.rpc_servers[i] if 0 <= i < len(self.rpc_servers) else None

    cdef int _rpc_check(self, str what, bint stream_timeout=False) except -1:
        """Raise if one of the model's RPC servers failed (during ``what``); the model is then unusable."""
        cdef bint to = False
        if self._rpcw == NULL or not self._rpcw.any_failed():
            return 0
        msg = _watch_error(self._rpcw, &to)
        self._rpc_error = msg
        ep = self._rpc_failed_endpoint()
        if to and stream_timeout:
            raise GenerationTimeout(f"no token within the timeout while {what}: {msg}; the connection was "
                                    f"dropped, so this model cannot be used any more: close it and load it again")
        raise RPCError(f"{msg} (while {what}); this model cannot be used any more (its layers on that server "
                       f"are gone): close it and load it again", endpoint=ep)

    @property
    def rpc_failed(self):
        """``None``, or why the model cannot be used any more (one of its RPC servers failed)."""
        if self._rpc_error is None and self._rpcw != NULL and self._rpcw.any_failed():
            try:
                self._rpc_check("checking the model")
            except MTPError:
                pass
        return self._rpc_error

    cdef inline void _check(self) except *:
        if self._closed:
            raise ClosedError("this Model is closed")

    cdef int _load_head(self, str path, llama_model_params mp) except -1:
        """Load an MTP-only sidecar GGUF (upstream's ``mtp-<name>.gguf``) and check that it fits."""
        _check_gguf_file(path)
        lay = _gguf_layout(path)
        arch, nextn = lay["arch"], lay["nextn"]
        if not nextn:
            # llama.cpp would try to load it as a whole model and fail on a missing tensor
            raise MTPUnsupportedError(
                f"{path!r} cannot be the MTP head of {self.path!r}: it has no MTP (NextN) layer "
                f"(architecture {arch!r}, nextn_predict_layers = {nextn}): it is not an MTP head, "
                f"e.g. a plain model was given as mtp_head")
        cdef bytes bpath = path.encode()
        cdef const char * cpath = bpath
        cdef llama_model * h
        mp.load_mtp = True
        mp.vocab_only = False
        mp.progress_callback = NULL
        mp.progress_callback_user_data = NULL
        _take_errors()
        with nogil:
            h = llama_model_load_from_file(cpath, mp)
        if h == NULL:
            raise ModelLoadError(f"failed to load the MTP head {path!r}: {_take_errors() or 'unknown error'}")
        try:
            why = _head_mismatch(self._model, h)
        except BaseException:
            llama_model_free(h)
            raise
        if why is not None:
            llama_model_free(h)
            raise MTPUnsupportedError(f"{path!r} cannot be the MTP head of {self.path!r}: {why}")
        self._head = h
        self._head_path = path
        self._mtp_loaded = True
        return 0

    cdef bint _has_sidecar(self):
        return self._head != NULL

    cdef const llama_model * _mtp_model(self):
        """The llama_model whose NextN block drafts (the model itself, or its MTP sidecar)."""
        return self._head if self._head != NULL else self._model

    @property
    def vocab_only(self):
        """``True`` when only the vocabulary was loaded (no weights: no Session/MTP)."""
        return self._vocab_only

    cdef void _retain(self):
        self._users += 1

    cdef void _release(self):
        self._users -= 1
        if self._closed and self._users <= 0:
            self._free()

    cdef void _free(self):
        cdef llama_model * m = self._model
        cdef llama_model * h = self._head
        if h != NULL:
            self._head = NULL
            with nogil:
                llama_model_free(h)
        mtp_cy_chat_free(self._chat_tmpls)
        self._chat_tmpls = NULL
        mtp_cy_chat_free(self._chat_tmpls_tools)
        self._chat_tmpls_tools = NULL
        if m != NULL:
            self._model = NULL
            self._vocab = NULL
            # RPC buffers are freed over the network (bounded by rpc_timeout)
            if self._rpcw != NULL:
                rpc.set_timeout(self._rpc_tus)
            with nogil:
                llama_model_free(m)

    def close(self):
        """Release the model (idempotent).  Weights stay alive while a session uses them."""
        self._closed = True
        if self._users <= 0:
            self._free()

    @property
    def closed(self):
        """``True`` once :meth:`close` was called."""
        return self._closed

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __dealloc__(self):
        mtp_cy_chat_free(self._chat_tmpls)
        self._chat_tmpls = NULL
        mtp_cy_chat_free(self._chat_tmpls_tools)
        self._chat_tmpls_tools = NULL
        if self._head != NULL:
            llama_model_free(self._head)
            self._head = NULL
        if self._model != NULL:
            llama_model_free(self._model)
            self._model = NULL
        if self._rpcw != NULL:
            del self._rpcw
            self._rpcw = NULL

    def __repr__(self):
        if self._closed:
            return f"<mtp_cy.Model closed path={self.path!r}>"
        return (f"<mtp_cy.Model {self.arch} {self.n_params / 1e6:.1f}M params"
                f"{(' +MTP(' + os.path.basename(self.mtp_head) + ')') if self.mtp_head else (' +MTP' if self.has_mtp else '')}"
                f"{' rpc=' + ','.join(self.rpc_servers) if self.rpc_servers else ''} path={self.path!r}>")

    # -- metadata ---------------------------------------------------------------
    cdef str _meta_str(self, bytes key):
        cdef int32_t n
        cdef vector[char] buf
        buf.resize(256)
        n = llama_model_meta_val_str(self._model, key, buf.data(), buf.size())
        if n < 0:
            return None
        if n >= <int32_t>buf.size():
            buf.resize(n + 1)
            n = llama_model_meta_val_str(self._model, key, buf.data(), buf.size())
        return buf.data()[:n].decode("utf-8", "replace")

    @property
    def metadata(self):
        """All GGUF key/values as a ``dict`` of strings (arrays are summarised by llama.cpp)."""
        self._check()
        cdef int32_t i, n, nk, nv
        cdef vector[char] kb, vb
        if self._meta_cache is None:
            d = {}
            kb.resize(512)
            vb.resize(4096)
            n = llama_model_meta_count(self._model)
            for i in range(n):
                nk = llama_model_meta_key_by_index(self._model, i, kb.data(), kb.size())
                if nk >= <int32_t>kb.size():
                    kb.resize(nk + 1)
                    nk = llama_model_meta_key_by_index(self._model, i, kb.data(), kb.size())
                nv = llama_model_meta_val_str_by_index(self._model, i, vb.data(), vb.size())
                if nv >= <int32_t>vb.size():
                    vb.resize(nv + 1)
                    nv = llama_model_meta_val_str_by_index(self._model, i, vb.data(), vb.size())
                if nk < 0 or nv < 0:
                    continue
                d[kb.data()[:nk].decode("utf-8", "replace")] = vb.data()[:nv].decode("utf-8", "replace")
            self._meta_cache = d
        return dict(self._meta_cache)

    @property
    def arch(self):
        """The GGUF ``general.architecture`` (e.g. ``"qwen35"``)."""
        self._check()
        return self._meta_str(b"general.architecture")

    @property
    def description(self):
        """llama.cpp's one-line description (architecture, size, type)."""
        self._check()
        cdef char buf[256]
        cdef int32_t n = llama_model_desc(self._model, buf, sizeof(buf))
        return buf[:max(n, 0)].decode("utf-8", "replace")

    @property
    def n_vocab(self):
        """Number of tokens in the vocabulary."""
        self._check()
        return llama_vocab_n_tokens(self._vocab)

    @property
    def n_ctx_train(self):
        """Context length the model was trained with."""
        self._check()
        return llama_model_n_ctx_train(self._model)

    @property
    def n_embd(self):
        """Embedding width."""
        self._check()
        return llama_model_n_embd(self._model)

    @property
    def n_layer(self):
        """Number of transformer blocks (as llama.cpp counts them)."""
        self._check()
        return llama_model_n_layer(self._model)

    @property
    def n_layer_nextn(self):
        """Number of MTP (NextN) layers of the head in use: the sidecar's with ``mtp_head=``,
        else the ones the GGUF declares (0 for a plain model)."""
        self._check()
        return llama_model_n_layer_nextn(self._mtp_model())

    @property
    def has_mtp(self):
        """``True`` when an MTP head is loaded: the GGUF's own layers (see ``load_mtp``) or a
        sidecar (``mtp_head``)."""
        self._check()
        return self._mtp_loaded

    @property
    def mtp_head(self):
        """The path of the MTP sidecar given as ``mtp_head=``, or ``None``."""
        return self._head_path

    @property
    def mtp_source(self):
        """Where the MTP head comes from: ``"sidecar"`` (``mtp_head=``, whose path is
        :attr:`mtp_head`), ``"model"`` (the GGUF's own layers) or ``None`` (no head)."""
        self._check()
        if self._head != NULL:
            return "sidecar"
        return "model" if self._mtp_loaded else None

    @property
    def n_params(self):
        """Number of parameters."""
        self._check()
        return llama_model_n_params(self._model)

    @property
    def size_bytes(self):
        """Size of the weights in bytes."""
        self._check()
        return llama_model_size(self._model)

    @property
    def chat_template(self):
        """The GGUF's ``tokenizer.chat_template`` or ``None``."""
        self._check()
        cdef const char * t = llama_model_chat_template(self._model, NULL)
        return None if t == NULL else (<bytes>t).decode("utf-8", "replace")

    @property
    def bos_token_id(self):
        """Beginning-of-sequence token id, or ``None``."""
        self._check()
        cdef llama_token t = llama_vocab_bos(self._vocab)
        return None if t < 0 else t

    @property
    def eos_token_id(self):
        """End-of-sequence token id, or ``None``."""
        self._check()
        cdef llama_token t = llama_vocab_eos(self._vocab)
        return None if t < 0 else t

    # -- tokens -------------------------------------------------------------------
    def tokenize(self, text, add_special=True, parse_special=True):
        """Tokenize ``text`` (``str`` or UTF-8 ``bytes``) into a numpy ``int32`` array.

        The defaults give exactly the tokens a ``str`` prompt becomes in
        :meth:`Session.stream`: BOS added when the vocabulary wants it, special tokens
        written in the text (``"<|im_start|>"``, ``"<|endoftext|>"``) parsed as such.
        ``parse_special=False`` treats them as plain text (for untrusted input)."""
        self._check()
        import numpy as np
        if isinstance(text, str):
            b = (<str>text).encode("utf-8")
        elif isinstance(text, (bytes, bytearray)):
            b = bytes(text)
        else:
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        return np.asarray(self._tokenize(b, add_special, parse_special), dtype=np.int32)

    cdef vector[llama_token] _tokenize(self, bytes b, bint add_special, bint parse_special) except *:
        cdef vector[llama_token] out
        cdef const char * s = b
        cdef Py_ssize_t ln = len(b)
        if ln > 0x7fffffff:
            raise ValueError("text too long to tokenize")
        out.resize(ln + 8)
        cdef int32_t n
        with nogil:
            n = llama_tokenize(self._vocab, s, <int32_t>ln, out.data(), <int32_t>out.size(),
                               add_special, parse_special)
        if n < 0:
            out.resize(-n)
            with nogil:
                n = llama_tokenize(self._vocab, s, <int32_t>ln, out.data(), <int32_t>out.size(),
                                   add_special, parse_special)
            if n < 0:
                raise MTPError("tokenization failed")
        out.resize(n)
        return out

    cdef inline bytes _piece(self, llama_token tok, bint special=True):
        cdef char buf[128]
        cdef int32_t n = llama_token_to_piece(self._vocab, tok, buf, sizeof(buf), 0, special)
        cdef vector[char] big
        if n >= 0:
            return PyBytes_FromStringAndSize(buf, n)
        big.resize(-n)
        n = llama_token_to_piece(self._vocab, tok, big.data(), big.size(), 0, special)
        return PyBytes_FromStringAndSize(big.data(), max(n, 0))

    cdef int _check_token(self, tok) except -1:
        if not isinstance(tok, int):
            try:
                import numpy as np
                if isinstance(tok, np.integer):
                    tok = int(tok)
                else:
                    raise TypeError
            except TypeError:
                raise TypeError(f"token ids must be ints, got {type(tok).__name__}") from None
        if tok < 0 or tok >= llama_vocab_n_tokens(self._vocab):
            raise ValueError(f"token id {tok} out of range [0, {llama_vocab_n_tokens(self._vocab)})")
        return tok

    def token_to_piece(self, token_id, special=True):
        """Return the bytes of one token (special tokens rendered when ``special``)."""
        self._check()
        return self._piece(self._check_token(token_id), special)

    def detokenize(self, tokens, remove_special=False, unparse_special=True):
        """Turn a sequence of token ids back into a ``str``."""
        self._check()
        cdef vector[llama_token] v
        for t in tokens:
            v.push_back(self._check_token(t))
        cdef vector[char] buf
        buf.resize(v.size() * 16 + 16)
        cdef int32_t n = llama_detokenize(self._vocab, v.data(), v.size(), buf.data(), buf.size(),
                                          remove_special, unparse_special)
        if n < 0:
            buf.resize(-n)
            n = llama_detokenize(self._vocab, v.data(), v.size(), buf.data(), buf.size(),
                                 remove_special, unparse_special)
        return buf.data()[:max(n, 0)].decode("utf-8", "replace")

    def is_eog(self, token_id):
        """``True`` if ``token_id`` ends generation (EOS, EOT, ...)."""
        self._check()
        return bool(llama_vocab_is_eog(self._vocab, self._check_token(token_id)))

    cdef vector[llama_token] _prompt_tokens(self, prompt) except *:
        """Turn a str or a sequence of ids into tokens (BOS added, special tokens parsed)."""
        cdef vector[llama_token] v
        if isinstance(prompt, str):
            v = self._tokenize((<str>prompt).encode("utf-8"), True, True)
        elif isinstance(prompt, (bytes, bytearray)):
            raise TypeError("prompt must be a str or a sequence of token ids, not bytes")
        else:
            try:
                it = iter(prompt)
            except TypeError:
                raise TypeError(f"prompt must be a str or a sequence of token ids, "
                                f"got {type(prompt).__name__}") from None
            for t in it:
                v.push_back(self._check_token(t))
        if v.size() == 0:
            raise ValueError("prompt is empty (it must contain at least one token)")
        return v

    # -- chat templates -------------------------------------------------------------
    def apply_chat_template(self, messages, *, add_generation_prompt=True, template=None, **kwargs):
        """Render a conversation with the model's chat template; return the prompt text.

        The template is the GGUF's own ``tokenizer.chat_template`` (a Jinja
        template), rendered by llama.cpp's chat-template engine from
        ``common/chat.h`` with Jinja enabled -- the code path of
        ``llama-server``'s ``/v1/chat/completions`` -- so modern templates
        (Qwen3.5/3.6 with thinking and tools, ...) render exactly as upstream
        renders them.

        * ``messages``: a list of ``{"role": ..., "content": ...}`` dicts
          (OpenAI style).  ``content`` is a ``str``, ``None`` or a list of
          ``{"type": "text", "text": ...}`` parts; assistant messages may carry
          ``reasoning_content`` and ``tool_calls``, tool messages ``tool_call_id``
          and ``name``.  A malformed message raises ``ValueError`` naming its
          index (``TypeError`` when ``messages`` is not a list at all).
        * ``add_generation_prompt``: append the assistant turn's opening (e.g.
          ``"<|im_start|>assistant\\n"``) so that the model writes the reply.
        * ``template``: a Jinja template string used instead of the GGUF's
          (``"chatml"`` selects llama.cpp's built-in ChatML template).
        * other keyword arguments are template variables (upstream's
          ``chat_template_kwargs``), JSON-serializable: e.g.
          ``enable_thinking=False`` for Qwen3 / Qwen3.5, ``reasoning_effort="low"``.
          ``tools=[...]`` (OpenAI tool definitions) is passed as upstream's
          tool list.

        When the vocabulary adds BOS by itself, a BOS the template renders at
        the very start is removed (as upstream does), so tokenizing the result
        with ``add_special=True`` (what :meth:`Session.stream` does with a
        ``str`` prompt) gives exactly one BOS.

        Raises :class:`ChatTemplateError` (a ``ValueError``) when the model has
        no chat template and ``template`` is not given, when the template does
        not parse, or when rendering fails (e.g. the template's own
        ``raise_exception``).
        """
        self._check()
        return self._apply_chat(messages, add_generation_prompt, template, kwargs)

    cdef str _apply_chat(self, messages, add_generation_prompt, template, dict kwargs, ChatParser parser=None):
        # sessions call this directly: a closed model whose weights a session keeps alive still renders
        if self._model == NULL:
            raise ClosedError("this Model is closed")
        if not isinstance(add_generation_prompt, bool):
            raise TypeError(f"add_generation_prompt must be True or False, got {add_generation_prompt!r}")
        msgs = _chat_messages_json(messages)
        tools, enable_thinking, kw = _chat_template_args(kwargs)
        cdef mtp_cy_chat_parser * p = NULL
        if parser is not None:
            p = parser.p
        return self._render_chat(msgs, tools, add_generation_prompt, enable_thinking, kw, template, p)

    cdef common_chat_templates * _compile_template(self, str src, str what) except NULL:
        """Parse a Jinja chat template (made stack-safe first, see mtp_cy._template_guard)."""
        cdef common_chat_templates * t = NULL
        cdef string csrc
        if src != "chatml" and _TEMPLATE_GUARD:
            try:
                src = _template_guard.guard(src)
            except _template_guard.TemplateTooDeep as exc:
                raise ChatTemplateError(f"{what.rstrip(':')} cannot be rendered safely: {exc}") from None
        csrc = src.encode("utf-8", "surrogatepass")
        try:
            with nogil:
                t = mtp_cy_chat_init(self._model, csrc)
        except Exception as exc:
            if what.endswith(":"):
                raise ChatTemplateError(f"{what} {exc}") from None
            raise ChatTemplateError(f"{what} does not parse: {exc}; pass a working one with template=...") from None
        return t

    cdef str _gguf_template(self, bytes name):
        cdef const char * t
        if name is None:
            t = llama_model_chat_template(self._model, NULL)
        else:
            t = llama_model_chat_template(self._model, name)
        return None if t == NULL else (<bytes>t).decode("utf-8", "replace")

    cdef str _render_chat(self, bytes msgs, bytes tools, bint agp, bint think, dict kw, template,
                          mtp_cy_chat_parser * parser=NULL):
        cdef common_chat_templates * t = NULL
        cdef bint own = False
        cdef cmap[string, string] m
        cdef string cmsgs = msgs
        cdef string ctools = tools
        cdef string out
        for k, v in kw.items():
            m[<string>k] = <string>v
        if template is None:
            default = self._gguf_template(None)
            tool_use = self._gguf_template(b"tool_use")
            if default is None and tool_use is None:
                raise ChatTemplateError(
                    f"{self.path!r} has no chat template (no tokenizer.chat_template in the GGUF); "
                    "pass one with template=... (the Jinja source, e.g. the model's chat_template.jinja "
                    "read into a str, or template='chatml')")
            what = f"the chat template of {self.path!r}"
            if tools and tool_use is not None and default is not None:
                # the GGUF's separate template for requests with tools (upstream picks it the same way)
                if self._chat_tmpls_tools == NULL:
                    self._chat_tmpls_tools = self._compile_template(tool_use, what + " (tool_use)")
                t = self._chat_tmpls_tools
            else:
                if self._chat_tmpls == NULL:
                    self._chat_tmpls = self._compile_template(default if default is not None else tool_use, what)
                t = self._chat_tmpls
        else:
            if not isinstance(template, str):
                raise TypeError(f"template must be a str (Jinja source) or None, got {type(template).__name__}")
            if not (<str>template).strip():
                raise ValueError("template is empty; pass the Jinja source, or None for the model's own template")
            t = self._compile_template(template, "invalid chat template (template=):")
            own = True
        err = None
        self._retain()      # the weights stay alive even if close() is called meanwhile
        try:
            with self._chat_lock:
                try:
                    with nogil:
                        out = mtp_cy_chat_apply(t, cmsgs, ctools, agp, think, m, parser)
                except Exception as exc:
                    err = exc
        finally:
            if own:
                mtp_cy_chat_free(t)
            self._release()
        if err is not None:
            raise ChatTemplateError(f"the chat template failed to render these messages: {err}") from None
        return out.decode("utf-8", "replace")
