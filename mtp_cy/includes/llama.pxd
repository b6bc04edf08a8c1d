# Declarations from include/llama.h (the pinned llama.cpp). Struct fields are
# listed in header order; tests/test_drift.py checks them against the header.
from libc.stdint cimport int8_t, int32_t, int64_t, uint32_t, uint64_t
from libcpp cimport bool as cbool
from mtp_cy.includes.ggml cimport (ggml_type, ggml_log_callback, ggml_abort_callback,
                                   ggml_backend_dev_t, ggml_threadpool_t)

cdef extern from "llama.h" nogil:
    ctypedef int32_t llama_pos
    ctypedef int32_t llama_token
    ctypedef int32_t llama_seq_id

    cdef struct llama_vocab:
        pass
    cdef struct llama_model:
        pass
    cdef struct llama_context:
        pass
    cdef struct llama_sampler:
        pass
    cdef struct llama_memory_i:
        pass
    ctypedef llama_memory_i * llama_memory_t
    cdef struct llama_batch_ext:
        pass

    enum llama_vocab_type_t "llama_vocab_type":
        LLAMA_VOCAB_TYPE_NONE = 0
        LLAMA_VOCAB_TYPE_SPM = 1
        LLAMA_VOCAB_TYPE_BPE = 2
        LLAMA_VOCAB_TYPE_WPM = 3
        LLAMA_VOCAB_TYPE_UGM = 4
        LLAMA_VOCAB_TYPE_RWKV = 5
        LLAMA_VOCAB_TYPE_PLAMO2 = 6

    enum llama_rope_scaling_type:
        LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED = -1
        LLAMA_ROPE_SCALING_TYPE_NONE = 0
        LLAMA_ROPE_SCALING_TYPE_LINEAR = 1
        LLAMA_ROPE_SCALING_TYPE_YARN = 2

    enum llama_pooling_type:
        LLAMA_POOLING_TYPE_UNSPECIFIED = -1
        LLAMA_POOLING_TYPE_NONE = 0
        LLAMA_POOLING_TYPE_MEAN = 1
        LLAMA_POOLING_TYPE_CLS = 2
        LLAMA_POOLING_TYPE_LAST = 3
        LLAMA_POOLING_TYPE_RANK = 4

    enum llama_attention_type:
        LLAMA_ATTENTION_TYPE_UNSPECIFIED = -1
        LLAMA_ATTENTION_TYPE_CAUSAL = 0
        LLAMA_ATTENTION_TYPE_NON_CAUSAL = 1

    enum llama_flash_attn_type:
        LLAMA_FLASH_ATTN_TYPE_AUTO = -1
        LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
        LLAMA_FLASH_ATTN_TYPE_ENABLED = 1

    enum llama_split_mode:
        LLAMA_SPLIT_MODE_NONE = 0
        LLAMA_SPLIT_MODE_LAYER = 1
        LLAMA_SPLIT_MODE_ROW = 2
        LLAMA_SPLIT_MODE_TENSOR = 3

    enum llama_load_mode:
        LLAMA_LOAD_MODE_AUTO = -1
        LLAMA_LOAD_MODE_NONE = 0
        LLAMA_LOAD_MODE_MMAP = 1
        LLAMA_LOAD_MODE_MLOCK = 2
        LLAMA_LOAD_MODE_MMAP_MLOCK = 3
        LLAMA_LOAD_MODE_DIRECT_IO = 4

    enum llama_lazy_mode:
        LLAMA_LAZY_MODE_OFF = 0
        LLAMA_LAZY_MODE_AUTO = 1
        LLAMA_LAZY_MODE_ON = 2

    enum llama_context_type:
        LLAMA_CONTEXT_TYPE_DEFAULT = 0
        LLAMA_CONTEXT_TYPE_MTP = 1

    enum llama_process_type:
        LLAMA_PROCESS_TYPE_ENCODE
        LLAMA_PROCESS_TYPE_DECODE

    ctypedef cbool (*llama_progress_callback)(float progress, void * user_data) noexcept

    cdef struct llama_model_kv_override:
        pass
    cdef struct llama_model_tensor_buft_override:
        pass
    cdef struct llama_sampler_seq_config:
        pass

    cdef struct llama_model_params:
        ggml_backend_dev_t * devices
        const llama_model_tensor_buft_override * tensor_buft_overrides
        int32_t n_gpu_layers
        llama_split_mode split_mode
        llama_load_mode load_mode
        llama_lazy_mode lazy_mode
        int32_t main_gpu
        const float * tensor_split
        llama_progress_callback progress_callback
        void * progress_callback_user_data
        const llama_model_kv_override * kv_overrides
        bint vocab_only
        bint check_tensors
        bint use_extra_bufts
        bint no_host
        bint no_alloc
        bint load_mtp

    cdef struct llama_context_params:
        uint32_t n_ctx
        uint32_t n_batch
        uint32_t n_ubatch
        uint32_t n_seq_max
        uint32_t n_rs_seq
        uint32_t n_outputs_max
        uint32_t n_outputs_max_per_seq
        int32_t n_threads
        int32_t n_threads_batch
        llama_context_type ctx_type
        llama_rope_scaling_type rope_scaling_type
        llama_pooling_type pooling_type
        llama_attention_type attention_type
        llama_flash_attn_type flash_attn_type
        float rope_freq_base
        float rope_freq_scale
        ggml_type type_k
        ggml_type type_v
        ggml_abort_callback abort_callback
        void * abort_callback_data
        bint embeddings
        bint offload_kqv
        bint no_perf
        bint op_offload
        bint swa_full
        bint kv_unified
        llama_context * ctx_other

    llama_model_params llama_model_default_params()
    llama_context_params llama_context_default_params()

    void llama_backend_init()
    void llama_backend_free()

    llama_model * llama_model_load_from_file(const char * path_model, llama_model_params params)
    void llama_model_free(llama_model * model)
    llama_context * llama_init_from_model(llama_model * model, llama_context_params params)
    void llama_free(llama_context * ctx)

    int64_t llama_time_us()
    size_t llama_max_devices()
    bint llama_supports_gpu_offload()
    bint llama_supports_rpc()

    uint32_t llama_n_ctx(const llama_context * ctx)
    uint32_t llama_n_batch(const llama_context * ctx)
    uint32_t llama_n_ubatch(const llama_context * ctx)
    uint32_t llama_n_rs_seq(const llama_context * ctx)

    const llama_model * llama_get_model(const llama_context * ctx)
    llama_memory_t llama_get_memory(const llama_context * ctx)
    const llama_vocab * llama_model_get_vocab(const llama_model * model)

    int32_t llama_model_n_ctx_train(const llama_model * model)
    int32_t llama_model_n_embd(const llama_model * model)
    int32_t llama_model_n_embd_out(const llama_model * model)
    int32_t llama_model_n_layer(const llama_model * model)
    int32_t llama_model_n_layer_nextn(const llama_model * model)
    int32_t llama_model_n_swa(const llama_model * model)
    int32_t llama_vocab_n_tokens(const llama_vocab * vocab)
    llama_vocab_type_t llama_vocab_type(const llama_vocab * vocab)

    int32_t llama_model_meta_val_str(const llama_model * model, const char * key, char * buf, size_t buf_size)
    int32_t llama_model_meta_count(const llama_model * model)
    int32_t llama_model_meta_key_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size)
    int32_t llama_model_meta_val_str_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size)
    int32_t llama_model_desc(const llama_model * model, char * buf, size_t buf_size)
    uint64_t llama_model_size(const llama_model * model)
    const char * llama_model_chat_template(const llama_model * model, const char * name)
    uint64_t llama_model_n_params(const llama_model * model)
    bint llama_model_is_recurrent(const llama_model * model)
    bint llama_model_is_hybrid(const llama_model * model)

    void llama_memory_clear(llama_memory_t mem, bint data)
    bint llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1)
    llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id)
    llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id)

    int32_t llama_process(llama_context * ctx, llama_process_type type, llama_batch_ext * batch) except +
    void llama_set_n_threads(llama_context * ctx, int32_t n_threads, int32_t n_threads_batch)
    void llama_attach_threadpool(llama_context * ctx, ggml_threadpool_t threadpool, ggml_threadpool_t threadpool_batch)
    void llama_detach_threadpool(llama_context * ctx)
    void llama_set_abort_callback(llama_context * ctx, ggml_abort_callback abort_callback, void * abort_callback_data)
    void llama_synchronize(llama_context * ctx)

    const char * llama_vocab_get_text(const llama_vocab * vocab, llama_token token)
    bint llama_vocab_is_eog(const llama_vocab * vocab, llama_token token)
    bint llama_vocab_is_control(const llama_vocab * vocab, llama_token token)
    llama_token llama_vocab_bos(const llama_vocab * vocab)
    llama_token llama_vocab_eos(const llama_vocab * vocab)
    bint llama_vocab_get_add_bos(const llama_vocab * vocab)

    int32_t llama_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                           llama_token * tokens, int32_t n_tokens_max,
                           bint add_special, bint parse_special)
    int32_t llama_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                                 int32_t length, int32_t lstrip, bint special)
    int32_t llama_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                             char * text, int32_t text_len_max, bint remove_special, bint unparse_special)

    llama_sampler * llama_sampler_init_grammar(const llama_vocab * vocab, const char * grammar_str,
                                               const char * grammar_root)
    void llama_sampler_free(llama_sampler * smpl)

    ctypedef uint32_t llama_state_seq_flags
    size_t llama_state_seq_get_size_ext(llama_context * ctx, llama_seq_id seq_id, llama_state_seq_flags flags)

    cdef struct llama_token_data:
        llama_token id
        float logit
        float p

    cdef struct llama_token_data_array:
        llama_token_data * data
        size_t size
        int64_t selected
        bint sorted

    cdef struct llama_embd:
        const float * data
        size_t n_rows
        size_t n_embd

    float * llama_get_logits_ith(llama_context * ctx, int32_t i)

    const char * llama_print_system_info()
    void llama_log_set(ggml_log_callback log_callback, void * user_data)


cdef extern from "llama-ext.h" nogil:
    # staging API of the pinned llama.cpp (src/llama-ext.h): the hidden rows that MTP heads use
    void llama_set_embeddings_nextn(llama_context * ctx, cbool value, cbool masked)
    float * llama_get_embeddings_nextn(llama_context * ctx)
    float * llama_get_embeddings_nextn_ith(llama_context * ctx, int32_t i)
