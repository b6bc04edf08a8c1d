# Declarations from ggml/include/gguf.h (reading a GGUF file's metadata before loading it).
from libc.stdint cimport int64_t, uint32_t
from libcpp cimport bool as cbool

cdef extern from "gguf.h" nogil:
    enum gguf_type:
        GGUF_TYPE_UINT8 = 0
        GGUF_TYPE_INT8 = 1
        GGUF_TYPE_UINT16 = 2
        GGUF_TYPE_INT16 = 3
        GGUF_TYPE_UINT32 = 4
        GGUF_TYPE_INT32 = 5
        GGUF_TYPE_FLOAT32 = 6
        GGUF_TYPE_BOOL = 7
        GGUF_TYPE_STRING = 8
        GGUF_TYPE_ARRAY = 9
        GGUF_TYPE_UINT64 = 10
        GGUF_TYPE_INT64 = 11
        GGUF_TYPE_FLOAT64 = 12

    struct gguf_context:
        pass
    struct ggml_context:
        pass

    struct gguf_init_params:
        cbool no_alloc
        ggml_context ** ctx

    gguf_context * gguf_init_from_file(const char * fname, gguf_init_params params)
    void gguf_free(gguf_context * ctx)
    int64_t gguf_find_key(const gguf_context * ctx, const char * key)
    gguf_type gguf_get_kv_type(const gguf_context * ctx, int64_t key_id)
    # these abort on a type mismatch: check gguf_get_kv_type first
    uint32_t gguf_get_val_u32(const gguf_context * ctx, int64_t key_id)
    const char * gguf_get_val_str(const gguf_context * ctx, int64_t key_id)
    int64_t gguf_get_n_tensors(const gguf_context * ctx)
    int64_t gguf_find_tensor(const gguf_context * ctx, const char * name)
    const char * gguf_get_tensor_name(const gguf_context * ctx, int64_t tensor_id)
