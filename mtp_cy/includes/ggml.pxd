# Declarations from ggml/include/ggml.h and ggml/include/ggml-backend.h (the pieces mtp_cy uses).
from libc.stdint cimport int64_t
from libcpp cimport bool as cbool

cdef extern from "ggml.h" nogil:
    enum ggml_log_level:
        GGML_LOG_LEVEL_NONE = 0
        GGML_LOG_LEVEL_DEBUG = 1
        GGML_LOG_LEVEL_INFO = 2
        GGML_LOG_LEVEL_WARN = 3
        GGML_LOG_LEVEL_ERROR = 4
        GGML_LOG_LEVEL_CONT = 5

    enum ggml_type:
        GGML_TYPE_F32 = 0
        GGML_TYPE_F16 = 1
        GGML_TYPE_Q4_0 = 2
        GGML_TYPE_Q4_1 = 3
        GGML_TYPE_Q5_0 = 6
        GGML_TYPE_Q5_1 = 7
        GGML_TYPE_Q8_0 = 8
        GGML_TYPE_IQ4_NL = 20
        GGML_TYPE_BF16 = 30
        GGML_TYPE_COUNT = 43

    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text, void * user_data) noexcept
    ctypedef cbool (*ggml_abort_callback)(void * data) noexcept

    const char * ggml_type_name(ggml_type type)
    void ggml_log_set(ggml_log_callback log_callback, void * user_data)
    int64_t ggml_time_us()
    void ggml_time_init()

    cdef struct ggml_threadpool:
        pass
    ctypedef ggml_threadpool * ggml_threadpool_t


cdef extern from "ggml-backend.h" nogil:
    ctypedef struct ggml_backend_device:
        pass
    ctypedef ggml_backend_device * ggml_backend_dev_t
    ctypedef struct ggml_backend_reg:
        pass
    ctypedef ggml_backend_reg * ggml_backend_reg_t

    enum ggml_backend_dev_type_t "ggml_backend_dev_type":
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL
        GGML_BACKEND_DEVICE_TYPE_META

    cdef struct ggml_backend_dev_props:
        const char * name
        const char * description
        size_t memory_free
        size_t memory_total
        ggml_backend_dev_type_t type
        const char * device_id

    void ggml_backend_dev_get_props(ggml_backend_dev_t device, ggml_backend_dev_props * props)
    size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg)
    ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index)
    ggml_backend_dev_t ggml_backend_dev_by_name(const char * name)
    const char * ggml_backend_dev_name(ggml_backend_dev_t device)
    const char * ggml_backend_dev_description(ggml_backend_dev_t device)
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total)
    ggml_backend_dev_type_t ggml_backend_dev_type(ggml_backend_dev_t device)
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device)
    const char * ggml_backend_reg_name(ggml_backend_reg_t reg)
    size_t ggml_backend_dev_count()
    ggml_backend_dev_t ggml_backend_dev_get(size_t index)
    void ggml_backend_load_all()
    void ggml_backend_load_all_from_path(const char * dir_path)
    size_t ggml_backend_reg_count()
    ggml_backend_reg_t ggml_backend_reg_get(size_t index)
    ggml_backend_reg_t ggml_backend_reg_by_name(const char * name)
    ggml_backend_dev_t ggml_backend_dev_by_type(ggml_backend_dev_type_t type)
    void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name)


cdef extern from "ggml-cpu.h" nogil:
    pass
