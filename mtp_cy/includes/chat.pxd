# Declarations of mtp_cy/_chat.h: llama.cpp's chat-template engine (common/chat.h).
from libcpp cimport bool as cbool
from libcpp.map cimport map as cmap
from libcpp.string cimport string
from libcpp.vector cimport vector
from mtp_cy.includes.llama cimport llama_model

cdef extern from "_chat.h" nogil:
    cdef struct common_chat_templates:
        pass

    common_chat_templates * mtp_cy_chat_init(const llama_model * model, const string & override_src) except +
    void mtp_cy_chat_free(common_chat_templates * t)
    string mtp_cy_chat_source(const common_chat_templates * t) except +
    cdef cppclass mtp_cy_chat_parser:
        vector[string] additional_stops
        string format_name

    string mtp_cy_chat_apply(const common_chat_templates * t, const string & messages_json,
                             const string & tools_json, cbool add_generation_prompt, cbool enable_thinking,
                             const cmap[string, string] & kwargs, mtp_cy_chat_parser * parser) except +
    mtp_cy_chat_parser * mtp_cy_chat_parser_new() except +
    void mtp_cy_chat_parser_free(mtp_cy_chat_parser * p)
    string mtp_cy_chat_parse(const mtp_cy_chat_parser * p, const string & text, cbool partial) except +
    string mtp_cy_json_schema_to_grammar(const string & schema_json) except +
