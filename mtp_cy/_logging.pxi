# The logging bridge: every llama.cpp / ggml log line goes to the Python logger
# "mtp_cy" at the matching level.  The logger has a NullHandler, so nothing is
# printed unless the application configures logging.

logger = logging.getLogger("mtp_cy")
logger.addHandler(logging.NullHandler())

cdef dict _LEVELS = {
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    GGML_LOG_LEVEL_INFO: logging.INFO,
    GGML_LOG_LEVEL_WARN: logging.WARNING,
    GGML_LOG_LEVEL_ERROR: logging.ERROR,
    GGML_LOG_LEVEL_NONE: logging.INFO,
}

cdef object _log_lock = threading.Lock()
cdef dict _partial = {}          # thread id -> (level, pending text without newline)
# thread id -> the last warning/error lines llama.cpp logged on that thread: an
# exception raised for a failed call quotes the lines of the thread that made
# the call, never another thread's
cdef dict _recent_errors = {}


cdef void _emit_line(int level, str line, tid):
    if level >= logging.WARNING:
        lines = _recent_errors.get(tid)
        if lines is None:
            if len(_recent_errors) >= 256:      # threads that never asked (e.g. finished ones)
                del _recent_errors[next(iter(_recent_errors))]
            lines = _recent_errors[tid] = []
        lines.append(line)
        if len(lines) > 20:
            del lines[:-20]
    if logger.isEnabledFor(level):
        logger.log(level, "%s", line)


cdef void _log_callback(ggml_log_level level, const char * text, void * user_data) noexcept with gil:
    cdef int pylevel
    try:
        msg = text.decode("utf-8", "replace")
        tid = threading.get_ident()
        with _log_lock:
            prev = _partial.pop(tid, None)
            if level == GGML_LOG_LEVEL_CONT and prev is not None:
                pylevel = prev[0]
                msg = prev[1] + msg
            elif prev is not None:
                # a new message while a previous line was unterminated: flush it
                _emit_line(prev[0], prev[1], tid)
                pylevel = _LEVELS.get(level, logging.INFO)
            else:
                pylevel = _LEVELS.get(level, logging.INFO)
            lines = msg.split("\n")
            for line in lines[:-1]:
                if line:
                    _emit_line(pylevel, line, tid)
            if lines[-1]:
                _partial[tid] = (pylevel, lines[-1])
    except BaseException:
        pass  # never let an exception escape into C


cdef str _take_errors():
    """Return (and clear) the recent warning/error log lines of the calling thread, for
    exception messages."""
    tid = threading.get_ident()
    with _log_lock:
        lines = _recent_errors.pop(tid, None) or []
        part = _partial.get(tid)
        if part is not None and part[0] >= logging.WARNING:
            lines.append(part[1])
            del _partial[tid]
        return "; ".join(lines[-5:])


cdef void _install_log_bridge():
    llama_log_set(_log_callback, NULL)
    ggml_log_set(_log_callback, NULL)
    # common/ has its own asynchronous logger that prints to the terminal;
    # pause it so that nothing is printed behind the application's back.
    common_log_pause(common_log_main())


_install_log_bridge()
