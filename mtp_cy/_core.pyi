"""Type stubs for mtp_cy._core (the compiled extension).

tests/test_stubs.py keeps them exact: every public name of the extension is here and
nothing else, and the keyword options (and their defaults) written here are the ones
the extension accepts.
"""
from __future__ import annotations

import os
from typing import (Any, Callable, Dict, Generic, Iterator, List, Literal, Mapping, NoReturn, Optional, Sequence,
                    Tuple, TypedDict, TypeVar, Union, overload)

from typing_extensions import Unpack

import numpy as np
import numpy.typing as npt

from mtp_cy._aio import AsyncStream
from mtp_cy.completion import Completion
from mtp_cy.errors import (ChatTemplateError as ChatTemplateError, ClosedError as ClosedError,
                           DecodeError as DecodeError, GenerationTimeout as GenerationTimeout,
                           GrammarError as GrammarError,
                           ModelLoadError as ModelLoadError, MTPError as MTPError,
                           MTPUnsupportedError as MTPUnsupportedError, NativeError as NativeError,
                           RPCError as RPCError, SessionBusyError as SessionBusyError,
                           QueueTimeout as QueueTimeout)

Prompt = Union[str, Sequence[int]]
FlashAttn = Literal["auto", "on", "off", True, False]
Stop = Union[None, str, Sequence[str]]
Message = Mapping[str, Any]       # {"role": str, "content": str | None | [{"type": "text", "text": str}], ...}
Tool = Mapping[str, Any]          # {"type": "function", "function": {"name": str, "parameters": {...}}}
JsonSchema = Union[None, str, Mapping[str, Any]]
KVType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
StopReason = Literal["eog", "stop_string", "max_tokens", "ctx_full", "cancelled", "error"]
#: how drafts are verified when sampling: "rejection" (speculative sampling) or "match" (upstream's)
SpecSampling = Literal["rejection", "match"]

CONTEXT_DEFAULTS: Dict[str, Any]
CONTEXT_OPTIONS: Tuple[str, ...]
SAMPLER_DEFAULTS: Dict[str, Any]
STREAM_DEFAULTS: Dict[str, Any]
STREAM_OPTIONS: Tuple[str, ...]
SPEC_SAMPLING_RULES: Tuple[str, ...]
llama_cpp_commit: str
DEFAULT_RPC_PORT: int


class GenerationOptions(TypedDict, total=False):
    """The options of every generating method (``stream``, ``stream_events``, ``generate``,
    ``complete``, the chat methods and their asyncio forms): the one place they are written
    for type checkers.  The runtime's single definition is ``STREAM_DEFAULTS``;
    tests/test_stubs.py checks that these keys and the defaults written here match it."""
    max_tokens: Optional[int]                 # default 256 (None: up to the context)
    timeout: Optional[float]                  # default 60.0 (seconds for the next tokens; None: none)
    prompt_timeout: Optional[float]           # default None
    temp: float                               # default 0.8 (0: greedy)
    top_k: int                                # default 40
    top_p: float                              # default 0.95
    min_p: float                              # default 0.05
    seed: Optional[int]                       # default None
    penalty_last_n: int                       # default 64
    penalty_repeat: float                     # default 1.0
    penalty_freq: float                       # default 0.0
    penalty_present: float                    # default 0.0
    grammar: Optional[str]                    # default None
    grammar_root: str                         # default "root"
    json_schema: JsonSchema                   # default None
    stop: Stop                                # default None
    logprobs: bool                            # default False
    top_logprobs: int                         # default 0
    emit_stats_every: int                     # default 0
    n_draft: Optional[int]                    # default None (the engine's; 0: plain for this call)
    spec_sampling: Optional[SpecSampling]     # default None (the engine's)


class TimingUs(TypedDict):
    draft: int
    verify: int
    sample: int
    total: int
    prefill: int


class CacheStats(TypedDict):
    tokens: int
    checkpoints: int
    checkpoint_bytes: int


class _StatsBase(TypedDict):
    iters: int
    drafts_generated: int
    drafts_accepted: int
    acceptance_rate: float
    tokens_emitted: int
    tokens_per_sec: float
    timing_us: TimingUs
    prompt_tokens: int
    prompt_tokens_cached: int
    calls: int
    n_draft: Union[int, Literal["auto"]]
    drafts_generated_by_pos: List[int]   # [i]: tokens drafted at draft position i + 1 ([] for a Session)
    drafts_accepted_by_pos: List[int]    # [i]: of those, accepted


class CallStats(_StatsBase, total=False):
    """One call's statistics (``Completion.stats``, the ``("done", ...)`` event)."""
    p_min: float                     # MTP only
    slot: int                        # Batch only: the slot the call ran in
    spec_sampling: SpecSampling      # the rule the call verified drafts with (greedy calls: "match")


class Stats(_StatsBase, total=False):
    """``stats()``: cumulative over every call of the session."""
    cache: CacheStats
    spec_sampling: Optional[SpecSampling]  # the engine's default (None: "rejection" whenever a call samples)
    p_min: float                     # MTP only
    policy: Dict[str, Any]           # MTP / Batch with n_draft="auto": what the policy measured and chose
    n_seq: int                       # Batch only
    batch: Dict[str, Any]            # Batch only: size (last step), steps, mean_size, waiting
    slots: List[Dict[str, Any]]      # Batch only: slot, state, cached_tokens, call counters


class FinalStats(CallStats, total=False):
    stop_reason: Literal["max_tokens", "ctx_full", "cancelled"]


class TokenLogprobRecord(TypedDict):
    logprob: float
    top_logprobs: List[Tuple[int, float]]
    text: str


class _DeviceBase(TypedDict):
    name: str
    description: str
    type: Literal["cpu", "gpu", "igpu", "accel", "unknown"]
    backend: str
    memory_free: int
    memory_total: int


class Device(_DeviceBase, total=False):
    endpoint: str          # RPC devices only: the server's "host:port"
    available: bool        # RPC devices only: False when the server does not answer


class BuildInfo(TypedDict):
    backend_dl: bool
    backends: Dict[str, Optional[str]]
    cpu_variant: Optional[str]


TokenEvent = Union[Tuple[Literal["token"], int, str],
                   Tuple[Literal["token"], int, str, TokenLogprobRecord]]   # the latter with logprobs=True
StatsEvent = Tuple[Literal["stats"], Stats]
DoneEvent = Tuple[Literal["done"], FinalStats]
EogEvent = Tuple[Literal["eog"], None]
StopEvent = Tuple[Literal["stop"], str]
Event = Union[TokenEvent, StatsEvent, DoneEvent, EogEvent, StopEvent]

_T = TypeVar("_T")


def init() -> None:
    """Initialise llama.cpp's backends (idempotent; done lazily by Model too)."""


def system_info() -> str:
    """ggml's CPU feature string (e.g. ``"CPU : SSE3 = 1 | AVX2 = 1 | ..."``)."""


def cpu_pools() -> Dict[str, Any]:
    """The CPU thread pools shared by the sessions of this process: ``pools``,
    ``helper_threads``, ``pauses`` (times an idle pool was paused) and ``can_pause``."""


def build_info() -> BuildInfo:
    """How mtp_cy was built (static, or portable with backend modules) and which file
    each loaded backend came from; ``cpu_variant`` is the CPU module picked for this CPU."""


def devices(rpc_servers: Union[None, str, Sequence[str]] = None, *,
            timeout: Optional[float] = 5.0) -> List[Device]:
    """The backend devices llama.cpp can use, with their memory (RPC servers' devices included)."""


def rpc_server(host: str = "127.0.0.1", port: int = 50052, *, threads: Optional[int] = None,
               cache_dir: Union[None, str, os.PathLike[str]] = None,
               devices: Union[None, str, Sequence[str]] = None) -> NoReturn:
    """Serve this machine's devices with llama.cpp's RPC server (blocks; unauthenticated protocol)."""


def json_schema_to_grammar(schema: Union[str, bytes, Mapping[str, Any]]) -> str:
    """A GBNF grammar admitting exactly the JSON documents valid for ``schema`` (llama.cpp's converter)."""


class Model:
    """A GGUF model loaded by llama.cpp (weights shared by every session on it)."""

    def __init__(self, path: Union[str, os.PathLike[str]], *, n_gpu_layers: int = -1, use_mmap: bool = True,
                 use_mlock: bool = False, load_mtp: Optional[bool] = None, main_gpu: int = 0,
                 split_mode: Literal["none", "layer", "row", "tensor"] = "layer",
                 tensor_split: Optional[Sequence[float]] = None, vocab_only: bool = False,
                 progress: Union[None, bool, Callable[[float], Optional[bool]]] = None,
                 rpc_servers: Union[None, str, Sequence[str]] = None,
                 rpc_timeout: Optional[float] = 30.0,
                 mtp_head: Union[None, str, os.PathLike[str]] = None) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def mtp_head(self) -> Optional[str]: ...
    @property
    def mtp_source(self) -> Optional[Literal["model", "sidecar"]]: ...
    @property
    def vocab_only(self) -> bool: ...
    @property
    def rpc_servers(self) -> Tuple[str, ...]: ...
    @property
    def rpc_failed(self) -> Optional[str]: ...
    @property
    def closed(self) -> bool: ...
    @property
    def metadata(self) -> Dict[str, str]: ...
    @property
    def arch(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_ctx_train(self) -> int: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def n_layer(self) -> int: ...
    @property
    def n_layer_nextn(self) -> int: ...
    @property
    def has_mtp(self) -> bool: ...
    @property
    def n_params(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def chat_template(self) -> Optional[str]: ...
    @property
    def bos_token_id(self) -> Optional[int]: ...
    @property
    def eos_token_id(self) -> Optional[int]: ...
    def tokenize(self, text: Union[str, bytes], add_special: bool = True,
                 parse_special: bool = True) -> npt.NDArray[np.int32]: ...
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes: ...
    def detokenize(self, tokens: Sequence[int], remove_special: bool = False,
                   unparse_special: bool = True) -> str: ...
    def is_eog(self, token_id: int) -> bool: ...
    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            template: Optional[str] = None, **kwargs: Any) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> Model: ...
    def __exit__(self, *exc: object) -> bool: ...


class ChatParser:
    """llama.cpp's chat parser set up for a rendered conversation (``stream.chat_parser``)."""

    def __init__(self) -> None: ...
    @property
    def format(self) -> str: ...
    @property
    def additional_stops(self) -> List[str]: ...
    def parse(self, text: str, partial: bool = False) -> Dict[str, Any]: ...


class _Stream(Iterator[_T], Generic[_T]):
    """The iterator returned by ``stream()`` (``_Stream[str]``) and ``stream_events()`` /
    ``chat_events()`` (``_Stream[Event]``)."""

    def __iter__(self) -> _Stream[_T]: ...
    def __next__(self) -> _T: ...
    def close(self) -> None: ...
    @property
    def finish_reason(self) -> Optional[FinishReason]: ...
    @property
    def stop_reason(self) -> Optional[StopReason]: ...
    @property
    def stop_string(self) -> Optional[str]: ...
    @property
    def completion(self) -> Optional[Completion]: ...
    @property
    def chat_parser(self) -> Optional[ChatParser]: ...
    @property
    def tokens_delivered(self) -> int: ...


class _Engine:
    """Base of Session, MTP and Batch: the generation API."""

    @property
    def model(self) -> Model: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_seq(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def stats(self) -> Stats: ...
    def reset_stats(self) -> None: ...
    def clear_cache(self) -> None: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...
    def stream(self, prompt: Prompt, **options: Unpack[GenerationOptions]) -> _Stream[str]: ...
    def stream_events(self, prompt: Prompt, **options: Unpack[GenerationOptions]) -> _Stream[Event]: ...
    def generate(self, prompt: Prompt, **options: Unpack[GenerationOptions]) -> str: ...
    def complete(self, prompt: Prompt, **options: Unpack[GenerationOptions]) -> Completion: ...
    def chat(self, messages: Sequence[Message], *, template: Optional[str] = None,
            chat_template_kwargs: Optional[Mapping[str, Any]] = None,
            enable_thinking: Optional[bool] = None, tools: Optional[Sequence[Tool]] = None,
            **options: Unpack[GenerationOptions]) -> _Stream[str]: ...
    def chat_events(self, messages: Sequence[Message], *, template: Optional[str] = None,
            chat_template_kwargs: Optional[Mapping[str, Any]] = None,
            enable_thinking: Optional[bool] = None, tools: Optional[Sequence[Tool]] = None,
            **options: Unpack[GenerationOptions]) -> _Stream[Event]: ...
    def complete_chat(self, messages: Sequence[Message], *, template: Optional[str] = None,
            chat_template_kwargs: Optional[Mapping[str, Any]] = None,
            enable_thinking: Optional[bool] = None, tools: Optional[Sequence[Tool]] = None,
            **options: Unpack[GenerationOptions]) -> Completion: ...
    def astream(self, prompt: Prompt, **options: Unpack[GenerationOptions]) -> AsyncStream[str]: ...
    def astream_events(self, prompt: Prompt, **options: Unpack[GenerationOptions]) -> AsyncStream[Event]: ...
    async def agenerate(self, prompt: Prompt, **options: Unpack[GenerationOptions]) -> str: ...
    def achat(self, messages: Sequence[Message], *, template: Optional[str] = None,
            chat_template_kwargs: Optional[Mapping[str, Any]] = None,
            enable_thinking: Optional[bool] = None, tools: Optional[Sequence[Tool]] = None,
            **options: Unpack[GenerationOptions]) -> AsyncStream[str]: ...
    def achat_events(self, messages: Sequence[Message], *, template: Optional[str] = None,
            chat_template_kwargs: Optional[Mapping[str, Any]] = None,
            enable_thinking: Optional[bool] = None, tools: Optional[Sequence[Tool]] = None,
            **options: Unpack[GenerationOptions]) -> AsyncStream[Event]: ...
    # OpenAI-shaped results (mtp_cy.openai_compat): dicts, or iterators of chunk dicts
    @overload
    def create_completion(self, prompt: Union[Prompt, Sequence[Prompt]], *, stream: Literal[False] = False,
                          **kwargs: Any) -> Dict[str, Any]: ...
    @overload
    def create_completion(self, prompt: Union[Prompt, Sequence[Prompt]], *, stream: Literal[True],
                          **kwargs: Any) -> Iterator[Dict[str, Any]]: ...
    @overload
    def create_chat_completion(self, messages: Sequence[Message], *, stream: Literal[False] = False,
                               **kwargs: Any) -> Dict[str, Any]: ...
    @overload
    def create_chat_completion(self, messages: Sequence[Message], *, stream: Literal[True],
                               **kwargs: Any) -> Iterator[Dict[str, Any]]: ...


class Session(_Engine):
    """Plain (non-speculative) decoding: the baseline of every MTP result."""

    def __init__(self, model: Model, *, n_ctx: int = 2048, n_batch: Optional[int] = None,
                 n_ubatch: Optional[int] = None, n_threads: Optional[int] = None,
                 n_threads_batch: Optional[int] = None, flash_attn: FlashAttn = "auto",
                 type_k: KVType = "f16", type_v: KVType = "f16", offload_kqv: bool = True,
                 cache_prompt: bool = True, cache_checkpoints: int = 8, checkpoint_every: int = 2048) -> None: ...
    def __enter__(self) -> Session: ...
    def __exit__(self, *exc: object) -> bool: ...


class MTP(_Engine):
    """Multi-Token Prediction speculative decoding with the model's own MTP head."""

    def __init__(self, model: Model, *, n_draft: Union[int, Literal["auto"]] = 3, p_min: float = 0.0,
                 n_draft_max: Optional[int] = None, spec_sampling: Optional[SpecSampling] = None,
                 n_ctx: int = 2048, n_batch: Optional[int] = None,
                 n_ubatch: Optional[int] = None, n_threads: Optional[int] = None,
                 n_threads_batch: Optional[int] = None, flash_attn: FlashAttn = "auto",
                 type_k: KVType = "f16", type_v: KVType = "f16", offload_kqv: bool = True,
                 cache_prompt: bool = True, cache_checkpoints: int = 8, checkpoint_every: int = 2048) -> None: ...
    @property
    def n_draft(self) -> Union[int, Literal["auto"]]: ...
    @property
    def n_draft_max(self) -> int: ...
    @property
    def p_min(self) -> float: ...
    def reset_policy(self) -> None: ...
    def print_stats(self) -> str: ...
    def __enter__(self) -> MTP: ...
    def __exit__(self, *exc: object) -> bool: ...


class Batch(_Engine):
    """Many calls at once, one sequence each: continuous batching with MTP speculative decoding.

    Every generating method may be called concurrently from many threads and asyncio tasks; a
    call beyond ``n_seq`` waits (in arrival order, bounded by its ``timeout``) for a free slot.
    ``n_draft=`` on a call overrides the Batch's draft length for that call (0: plain)."""

    def __init__(self, model: Model, *, n_seq: int = 4, n_draft: Union[int, Literal["auto"]] = "auto",
                 n_draft_max: Optional[int] = None, p_min: float = 0.0, n_ctx: Optional[int] = None,
                 cache_ram: int = 1073741824, spec_sampling: Optional[SpecSampling] = None,
                 n_batch: Optional[int] = None, n_ubatch: Optional[int] = None, n_threads: Optional[int] = None,
                 n_threads_batch: Optional[int] = None, flash_attn: FlashAttn = "auto",
                 type_k: KVType = "f16", type_v: KVType = "f16", offload_kqv: bool = True,
                 cache_prompt: bool = True, cache_checkpoints: int = 8, checkpoint_every: int = 2048) -> None: ...
    @property
    def n_seq(self) -> int: ...
    @property
    def n_ctx_total(self) -> int: ...
    @property
    def n_draft(self) -> Union[int, Literal["auto"]]: ...
    @property
    def n_draft_max(self) -> int: ...
    @property
    def p_min(self) -> float: ...
    def reset_policy(self) -> None: ...
    def print_stats(self) -> str: ...
    def __enter__(self) -> Batch: ...
    def __exit__(self, *exc: object) -> bool: ...


class DraftPolicy:
    """The draft-length policy of ``MTP(n_draft="auto")`` on its own (simulations, tests)."""

    def __init__(self, k_max: int = 4, *, p_min: float = 0.0, min_gap: Optional[int] = None,
                 max_gap: Optional[int] = None, explore_every: Optional[int] = None,
                 refine_iters: Optional[int] = None, plain_run: Optional[int] = None) -> None: ...
    @property
    def k_max(self) -> int: ...
    @property
    def p_min(self) -> float: ...
    @property
    def drafting_iterations(self) -> int: ...
    def choose(self) -> int: ...
    def observe(self, k: int, n_accepted: int, *, verify_us: float, draft_us: float = 0.0, draft_steps: int = 0,
                catch_up_us: float = 0.0, catch_up_tokens: int = 0, sample_us: float = 0.0,
                k_chosen: Optional[int] = None) -> None: ...
    def observe_confidence(self, p: float, accepted: bool, position: Optional[int] = None) -> None: ...
    def calibrated(self, p: float) -> float: ...
    def keeps(self, p: float, last: bool = False) -> bool: ...
    @property
    def cut_active(self) -> bool: ...
    @property
    def cut_below(self) -> float: ...
    @property
    def break_even(self) -> float: ...
    def pass_rate(self, position: int, k: Optional[int] = None) -> float: ...
    def reset(self) -> None: ...
    def expected_tokens(self, k: int) -> float: ...
    def cost_us(self, k: int) -> float: ...
    def tokens_per_second(self, k: int) -> float: ...
    def acceptance(self, position: int, k: Optional[int] = None) -> float: ...
    @property
    def best(self) -> int: ...
    @property
    def chosen(self) -> Dict[int, int]: ...
    @property
    def iterations(self) -> int: ...
