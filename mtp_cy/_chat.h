// Chat templates through llama.cpp's own engine (common/chat.h, the one
// llama-server uses, jinja enabled).  Thin wrappers so that the Cython side
// only sees plain types; every function may throw (declared `except +`).
#pragma once
#include <exception>
#include <functional>
#include <map>
#include <string>
#include <vector>
#if !defined(_WIN32)
#include <pthread.h>
#endif

#include "chat.h"
#include "json.h"
#include "json-schema-to-grammar.h"

// Run `fn` on a thread with a large stack (256 MiB of address space, only
// what is touched is committed) and wait for it; its exception is rethrown
// here.  llama.cpp's Jinja parser and runtime recurse once per nested
// construct: mtp_cy/_template_guard.py bounds the depth, and the big stack
// keeps legitimately deep templates working.  Falls back to the calling
// thread when such a thread cannot be created.
static inline void mtp_cy_run_on_big_stack(const std::function<void()> & fn) {
#if !defined(_WIN32)
    struct job_t {
        const std::function<void()> * fn;
        std::exception_ptr err;
    } job{ &fn, nullptr };
    auto trampoline = [](void * p) -> void * {
        auto * j = (job_t *) p;
        try {
            (*j->fn)();
        } catch (...) {
            j->err = std::current_exception();
        }
        return nullptr;
    };
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) == 0) {
        pthread_t th;
        int rc = -1;
        for (size_t mib : { 256, 64 }) {
            if (pthread_attr_setstacksize(&attr, mib << 20) == 0 &&
                (rc = pthread_create(&th, &attr, trampoline, &job)) == 0) {
                break;
            }
        }
        pthread_attr_destroy(&attr);
        if (rc == 0) {
            pthread_join(th, nullptr);
            if (job.err) {
                std::rethrow_exception(job.err);
            }
            return;
        }
    }
#endif
    fn();
}

// Parse a chat template: `override_src` empty means the GGUF's own
// tokenizer.chat_template (the caller checks that there is one).  The result
// is owned by the caller (free with mtp_cy_chat_free).
static inline common_chat_templates * mtp_cy_chat_init_here(const llama_model * model,
                                                            const std::string & override_src) {
    try {
        return common_chat_templates_init(model, override_src).release();
    } catch (const std::exception &) {
        // upstream logs the parse error and rethrows it sliced to a plain
        // std::exception (its message lost): parse again to raise the real one
        std::string src = override_src;
        if (src.empty() && model != nullptr) {
            const char * t = llama_model_chat_template(model, nullptr);
            src = t ? t : "";
        }
        common_chat_template probe(src, "", "");
        throw;
    }
}

static inline common_chat_templates * mtp_cy_chat_init(const llama_model * model,
                                                       const std::string & override_src) {
    common_chat_templates * t = nullptr;
    mtp_cy_run_on_big_stack([&] { t = mtp_cy_chat_init_here(model, override_src); });
    return t;
}

static inline void mtp_cy_chat_free(common_chat_templates * t) {
    if (t) {
        common_chat_templates_free(t);
    }
}

static inline std::string mtp_cy_chat_source(const common_chat_templates * t) {
    return common_chat_templates_source(t);
}

// What is needed to parse the model's reply to a rendered conversation
// (reasoning, tool calls) with upstream's chat parser.
struct mtp_cy_chat_parser {
    common_chat_parser_params params;
    std::vector<std::string> additional_stops;
    std::string format_name;
};

// Render `messages_json` (an OpenAI-style JSON array of messages) with the
// template, as llama-server's /v1/chat/completions does: messages and tools
// parsed by common_chat_msgs_parse_oaicompat / common_chat_tools_parse_oaicompat,
// `kwargs` are chat_template_kwargs (name -> JSON text); with `parser`, what the
// reply's parser needs is filled in.  On the calling thread: mtp_cy_chat_apply
// runs it on a big stack.
static inline std::string mtp_cy_chat_apply_here(const common_chat_templates * t,
                                                 const std::string & messages_json,
                                                 const std::string & tools_json,
                                                 bool add_generation_prompt,
                                                 bool enable_thinking,
                                                 const std::map<std::string, std::string> & kwargs,
                                                 mtp_cy_chat_parser * parser) {
    common_chat_templates_inputs inputs;
    inputs.messages = common_chat_msgs_parse_oaicompat(common_json::parse(messages_json));
    if (!tools_json.empty()) {
        inputs.tools = common_chat_tools_parse_oaicompat(common_json::parse(tools_json));
    }
    inputs.add_generation_prompt = add_generation_prompt;
    inputs.use_jinja             = true;
    inputs.enable_thinking       = enable_thinking;
    inputs.chat_template_kwargs  = kwargs;
    if (parser) {
        inputs.reasoning_format = COMMON_REASONING_FORMAT_AUTO;
    }
    common_chat_params res = common_chat_templates_apply(t, inputs);
    if (parser) {
        parser->params = common_chat_parser_params(res);
        parser->params.reasoning_format = COMMON_REASONING_FORMAT_AUTO;
        if (!res.parser.empty()) {
            parser->params.parser.load(res.parser);
        }
        parser->additional_stops = res.additional_stops;
        parser->format_name = common_chat_format_name(res.format);
    }
    return res.prompt;
}

static inline std::string mtp_cy_chat_apply(const common_chat_templates * t,
                                            const std::string & messages_json,
                                            const std::string & tools_json,
                                            bool add_generation_prompt,
                                            bool enable_thinking,
                                            const std::map<std::string, std::string> & kwargs,
                                            mtp_cy_chat_parser * parser) {
    std::string out;
    mtp_cy_run_on_big_stack([&] {
        out = mtp_cy_chat_apply_here(t, messages_json, tools_json, add_generation_prompt, enable_thinking,
                                     kwargs, parser);
    });
    return out;
}

static inline mtp_cy_chat_parser * mtp_cy_chat_parser_new() { return new mtp_cy_chat_parser(); }
static inline void mtp_cy_chat_parser_free(mtp_cy_chat_parser * p) { delete p; }

// Parse `text` (the reply generated after the rendered prompt; `partial` while it is
// still being generated) into an OpenAI-style message: JSON with "role", "content",
// "reasoning_content", "tool_calls".
static inline std::string mtp_cy_chat_parse(const mtp_cy_chat_parser * p, const std::string & text, bool partial) {
    std::string out;
    mtp_cy_run_on_big_stack([&] {
        common_chat_msg msg = common_chat_parse(text, partial, p->params);
        out = msg.to_json_oaicompat().dump();
    });
    return out;
}

// JSON schema (a JSON document) -> GBNF grammar, with upstream's converter.
static inline std::string mtp_cy_json_schema_to_grammar(const std::string & schema_json) {
    std::string out;
    mtp_cy_run_on_big_stack([&] { out = json_schema_to_grammar(common_json::parse(schema_json), true); });
    return out;
}
