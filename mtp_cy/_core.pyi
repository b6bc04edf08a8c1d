"""Type stubs for mtp_cy._core (the compiled extension)."""
from __future__ import annotations

import os
from typing import (Any, Callable, Dict, Iterator, List, Literal, Mapping, NoReturn, Optional, Sequence, Tuple,
                    TypedDict, Union)

import numpy as np
import numpy.typing as npt

from mtp_cy._aio import AsyncStream

Prompt = Union[str, Sequence[int]]
FlashAttn = Literal["auto", "on", "off", True, False]
Stop = Union[None, str, Sequence[str]]
Message = Mapping[str, Any]       # {"role": str, "content": str | None | [{"type": "text", "text": str}], ...}
KVType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]

CONTEXT_DEFAULTS: Dict[str, Any]
CONTEXT_OPTIONS: Tuple[str, ...]
SAMPLER_DEFAULTS: Dict[str, Any]
STREAM_DEFAULTS: Dict[str, Any]
STREAM_OPTIONS: Tuple[str, ...]
llama_cpp_commit: str
DEFAULT_RPC_PORT: int


class TimingUs(TypedDict):
    draft: int
    verify: int
    sample: int
    total: int
    prefill: int


class Stats(TypedDict):
    iters: int
    drafts_generated: int
    drafts_accepted: int
    acceptance_rate: float
    tokens_emitted: int
    tokens_per_sec: float
    timing_us: TimingUs
    n_draft: int
    prompt_tokens: int
    calls: int


class FinalStats(Stats, total=False):
    stop_reason: Literal["max_tokens", "ctx_full", "cancelled"]


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


TokenEvent = Tuple[Literal["token"], int, str]
StatsEvent = Tuple[Literal["stats"], Stats]
DoneEvent = Tuple[Literal["done"], FinalStats]
EogEvent = Tuple[Literal["eog"], None]
StopEvent = Tuple[Literal["stop"], str]
Event = Union[TokenEvent, StatsEvent, DoneEvent, EogEvent, StopEvent]


def init() -> None:
    """Initialise llama.cpp's backends (idempotent; done lazily by Model too)."""


def system_info() -> str:
    """ggml's CPU feature string (e.g. ``"CPU : SSE3 = 1 | AVX2 = 1 | ..."``)."""


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


class Model:
    """A GGUF model loaded by llama.cpp (weights shared by every session on it)."""

    def __init__(self, path: Union[str, os.PathLike[str]], *, n_gpu_layers: int = -1, use_mmap: bool = True,
                 use_mlock: bool = False, load_mtp: Optional[bool] = None, main_gpu: int = 0,
                 split_mode: Literal["none", "layer", "row", "tensor"] = "layer",
                 tensor_split: Optional[Sequence[float]] = None, vocab_only: bool = False,
                 progress: Union[None, bool, Callable[[float], Optional[bool]]] = None,
                 rpc_servers: Union[None, str, Sequence[str]] = None,
                 rpc_timeout: Optional[float] = 30.0) -> None: ...
    @property
    def path(self) -> str: ...
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
                 parse_special: bool = False) -> npt.NDArray[np.int32]: ...
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes: ...
    def detokenize(self, tokens: Sequence[int], remove_special: bool = False,
                   unparse_special: bool = True) -> str: ...
    def is_eog(self, token_id: int) -> bool: ...
    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            template: Optional[str] = None, **kwargs: Any) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> Model: ...
    def __exit__(self, *exc: object) -> bool: ...


class _Stream(Iterator[Any]):
    """The iterator returned by ``stream()`` / ``stream_events()``."""

    def __iter__(self) -> _Stream: ...
    def __next__(self) -> Any: ...
    def close(self) -> None: ...
    @property
    def finish_reason(self) -> Optional[Literal["max_tokens", "eog", "stop", "ctx_full", "cancelled", "error"]]: ...
    @property
    def stop_string(self) -> Optional[str]: ...
    @property
    def tokens_delivered(self) -> int: ...


class _Engine:
    @property
    def model(self) -> Model: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def stats(self) -> Stats: ...
    def reset_stats(self) -> None: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...
    def stream(self, prompt: Prompt, *, max_tokens: int = 256, timeout: Optional[float] = 60.0,
               temp: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
               seed: Optional[int] = None, penalty_last_n: int = 64, penalty_repeat: float = 1.0,
               penalty_freq: float = 0.0, penalty_present: float = 0.0, grammar: Optional[str] = None,
               grammar_root: str = "root", stop: Stop = None, emit_stats_every: int = 0) -> Iterator[str]: ...
    def stream_events(self, prompt: Prompt, emit_stats_every: int = 0, *, max_tokens: int = 256,
                      timeout: Optional[float] = 60.0, temp: float = 0.8, top_k: int = 40,
                      top_p: float = 0.95, min_p: float = 0.05, seed: Optional[int] = None,
                      penalty_last_n: int = 64, penalty_repeat: float = 1.0, penalty_freq: float = 0.0,
                      penalty_present: float = 0.0, grammar: Optional[str] = None,
                      grammar_root: str = "root", stop: Stop = None) -> Iterator[Event]: ...
    def generate(self, prompt: Prompt, *, max_tokens: int = 256, timeout: Optional[float] = 60.0,
                 temp: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 seed: Optional[int] = None, penalty_last_n: int = 64, penalty_repeat: float = 1.0,
                 penalty_freq: float = 0.0, penalty_present: float = 0.0, grammar: Optional[str] = None,
                 grammar_root: str = "root", stop: Stop = None, emit_stats_every: int = 0) -> str: ...
    # chat: the conversation rendered with Model.apply_chat_template, then as stream()
    def chat(self, messages: Sequence[Message], *, template: Optional[str] = None,
             chat_template_kwargs: Optional[Mapping[str, Any]] = None, max_tokens: int = 256,
             timeout: Optional[float] = 60.0, temp: float = 0.8, top_k: int = 40, top_p: float = 0.95,
             min_p: float = 0.05, seed: Optional[int] = None, penalty_last_n: int = 64,
             penalty_repeat: float = 1.0, penalty_freq: float = 0.0, penalty_present: float = 0.0,
             grammar: Optional[str] = None, grammar_root: str = "root", stop: Stop = None,
             emit_stats_every: int = 0) -> Iterator[str]: ...
    def chat_events(self, messages: Sequence[Message], *, template: Optional[str] = None,
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None, emit_stats_every: int = 0,
                    max_tokens: int = 256, timeout: Optional[float] = 60.0, temp: float = 0.8, top_k: int = 40,
                    top_p: float = 0.95, min_p: float = 0.05, seed: Optional[int] = None,
                    penalty_last_n: int = 64, penalty_repeat: float = 1.0, penalty_freq: float = 0.0,
                    penalty_present: float = 0.0, grammar: Optional[str] = None, grammar_root: str = "root",
                    stop: Stop = None) -> Iterator[Event]: ...
    # asyncio: the native steps run in a worker thread; see mtp_cy._aio
    def astream(self, prompt: Prompt, *, max_tokens: int = 256, timeout: Optional[float] = 60.0,
                temp: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                seed: Optional[int] = None, penalty_last_n: int = 64, penalty_repeat: float = 1.0,
                penalty_freq: float = 0.0, penalty_present: float = 0.0, grammar: Optional[str] = None,
                grammar_root: str = "root", stop: Stop = None, emit_stats_every: int = 0) -> AsyncStream[str]: ...
    def astream_events(self, prompt: Prompt, emit_stats_every: int = 0, *, max_tokens: int = 256,
                       timeout: Optional[float] = 60.0, temp: float = 0.8, top_k: int = 40,
                       top_p: float = 0.95, min_p: float = 0.05, seed: Optional[int] = None,
                       penalty_last_n: int = 64, penalty_repeat: float = 1.0, penalty_freq: float = 0.0,
                       penalty_present: float = 0.0, grammar: Optional[str] = None,
                       grammar_root: str = "root", stop: Stop = None) -> AsyncStream[Event]: ...
    async def agenerate(self, prompt: Prompt, *, max_tokens: int = 256, timeout: Optional[float] = 60.0,
                        temp: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                        seed: Optional[int] = None, penalty_last_n: int = 64, penalty_repeat: float = 1.0,
                        penalty_freq: float = 0.0, penalty_present: float = 0.0, grammar: Optional[str] = None,
                        grammar_root: str = "root", stop: Stop = None, emit_stats_every: int = 0) -> str: ...
    def achat(self, messages: Sequence[Message], *, template: Optional[str] = None,
              chat_template_kwargs: Optional[Mapping[str, Any]] = None, max_tokens: int = 256,
              timeout: Optional[float] = 60.0, temp: float = 0.8, top_k: int = 40, top_p: float = 0.95,
              min_p: float = 0.05, seed: Optional[int] = None, penalty_last_n: int = 64,
              penalty_repeat: float = 1.0, penalty_freq: float = 0.0, penalty_present: float = 0.0,
              grammar: Optional[str] = None, grammar_root: str = "root", stop: Stop = None,
              emit_stats_every: int = 0) -> AsyncStream[str]: ...
    def achat_events(self, messages: Sequence[Message], *, template: Optional[str] = None,
                     chat_template_kwargs: Optional[Mapping[str, Any]] = None, emit_stats_every: int = 0,
                     max_tokens: int = 256, timeout: Optional[float] = 60.0, temp: float = 0.8, top_k: int = 40,
                     top_p: float = 0.95, min_p: float = 0.05, seed: Optional[int] = None,
                     penalty_last_n: int = 64, penalty_repeat: float = 1.0, penalty_freq: float = 0.0,
                     penalty_present: float = 0.0, grammar: Optional[str] = None, grammar_root: str = "root",
                     stop: Stop = None) -> AsyncStream[Event]: ...


class Session(_Engine):
    """Plain (non-speculative) decoding: the baseline of every MTP result."""

    def __init__(self, model: Model, *, n_ctx: int = 2048, n_batch: Optional[int] = None,
                 n_ubatch: Optional[int] = None, n_threads: Optional[int] = None,
                 n_threads_batch: Optional[int] = None, flash_attn: FlashAttn = "auto",
                 type_k: KVType = "f16", type_v: KVType = "f16", offload_kqv: bool = True) -> None: ...
    def __enter__(self) -> Session: ...
    def __exit__(self, *exc: object) -> bool: ...


class MTP(_Engine):
    """Multi-Token Prediction speculative decoding with the model's own MTP head."""

    def __init__(self, model: Model, *, n_draft: int = 3, n_ctx: int = 2048, n_batch: Optional[int] = None,
                 n_ubatch: Optional[int] = None, n_threads: Optional[int] = None,
                 n_threads_batch: Optional[int] = None, flash_attn: FlashAttn = "auto",
                 type_k: KVType = "f16", type_v: KVType = "f16", offload_kqv: bool = True) -> None: ...
    @property
    def n_draft(self) -> int: ...
    def print_stats(self) -> str: ...
    def __enter__(self) -> MTP: ...
    def __exit__(self, *exc: object) -> bool: ...
