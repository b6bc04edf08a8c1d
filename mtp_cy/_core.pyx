# cython: language_level=3, cdivision=True
# distutils: language = c++
"""mtp_cy's native core: llama.cpp linked statically, loops in nogil code.

The implementation is split by feature into ``.pxi`` files included below:
``_logging.pxi`` (log bridge), ``_backend.pxi`` (init, devices, system info),
``_rpc.pxi`` (RPC servers: models split across hosts),
``_model.pxi`` (:class:`Model`), ``_sampling.pxi`` (sampler options),
``_engine.pxi`` (the engine shared by both session kinds: contexts, thread
pool, native step driver, prompt cache, the generation API), ``_stream.pxi``
(the token stream: stop strings, events),
``_session.pxi`` (:class:`Session`, plain decoding) and ``_mtp.pxi``
(:class:`MTP`, speculative decoding with the model's MTP head).
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memset
from libc.stdlib cimport malloc, free
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector

from mtp_cy.includes.ggml cimport *
from mtp_cy.includes.llama cimport *
from mtp_cy.includes.common cimport *
from mtp_cy.includes.sampling cimport *
from mtp_cy.includes.native cimport *
from mtp_cy.includes.chat cimport *
from mtp_cy.includes.gguf cimport *
from libcpp.map cimport map as cmap

import codecs
import json
import logging
import os
import threading
import time as _time

from mtp_cy import _template_guard

from mtp_cy.errors import (MTPError, ModelLoadError, DecodeError, MTPUnsupportedError, NativeError,
                           SessionBusyError, ClosedError, GenerationTimeout, ChatTemplateError, RPCError,
                           GrammarError, QueueTimeout)
from mtp_cy import _grammar_check

include "_logging.pxi"
include "_rpc.pxi"
include "_backend.pxi"
include "_chat.pxi"
include "_model.pxi"
include "_sampling.pxi"
include "_engine.pxi"
include "_stream.pxi"
include "_session.pxi"
include "_mtp.pxi"
include "_batch.pxi"
