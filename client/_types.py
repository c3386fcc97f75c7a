"""The client's typed values: generation options in, chunks and results out (no grpc, no protobuf)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

__all__ = [
    "CancelResult",
    "Chunk",
    "Chunking",
    "GenerateOptions",
    "HealthStatus",
    "InterruptMode",
    "Message",
    "MessageLike",
    "ModelInfo",
    "Result",
    "StopReason",
    "Summary",
    "Timings",
    "TokenLogprob",
    "Tokens",
    "TopLogprob",
    "Usage",
]


class _StrEnum(str, enum.Enum):
    """A str enum that prints as its value (enum.StrEnum needs Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)


class StopReason(_StrEnum):
    """Why a generation ended (tokenwire.v1.StopReason without its prefix, lower case)."""

    UNSPECIFIED = "unspecified"
    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    DEADLINE = "deadline"
    CONTEXT_LENGTH = "context_length"
    ERROR = "error"
    SHUTDOWN = "shutdown"  # the server shut down before the generation ended: it may be retried elsewhere


class Chunking(_StrEnum):
    """How generated text is cut into chunks (see tokenwire.v1.Chunking)."""

    TOKEN = "token"
    WORD = "word"
    SENTENCE = "sentence"
    CLAUSE = "clause"


class InterruptMode(_StrEnum):
    """When an interrupt takes effect: at the next decode step, or once the current segment ends."""

    IMMEDIATE = "immediate"
    AFTER_SEGMENT = "after_segment"


class HealthStatus(_StrEnum):
    """grpc.health.v1 serving status."""

    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    SERVICE_UNKNOWN = "service_unknown"


@dataclass(frozen=True)
class Message:
    """One chat turn. Plain `{"role": ..., "content": ...}` dicts and `(role, content)` pairs work too."""

    role: str
    content: str


MessageLike = Message | Mapping[str, str] | tuple[str, str]


class GenerateOptions(TypedDict, total=False):
    """Keyword options of `generate`, `complete` and `Stream.start`; all optional (None = server default).

    Input (exactly one of these or the positional prompt): `messages` (chat turns, rendered with the
    model's chat template), `token_ids` (used as given). Everything else maps onto tokenwire.v1.Start;
    the .proto documents each field's default, limits and what happens to it on interrupt."""

    messages: Sequence[MessageLike] | None
    token_ids: Sequence[int] | None
    # Sampling. Absent temperature (or 0) is greedy decoding.
    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None
    # Stopping.
    max_tokens: int | None
    min_tokens: int | None
    stop: str | Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool | None
    time_limit_ms: int | None
    # Output.
    chunking: Chunking | str | None
    logprobs: bool | None
    top_logprobs: int | None
    include_token_ids: bool | None  # fill Chunk.token_ids
    timestamps: bool | None  # fill Chunk.server_time_ms
    min_segment_chars: int | None
    fast_first_segment: bool | None
    # Identity and sessions. A missing request_id is chosen by the client (a uuid4 hex).
    request_id: str | None
    session_id: str | None
    continue_session: bool | None  # refuse (NotFound) rather than start a new history when it is gone
    truncate_reply_chars: int | None  # cut the session's last reply to what was heard, in characters
    truncate_reply_tokens: int | None  # ... or in tokens


@dataclass(frozen=True)
class TopLogprob:
    """One alternative token."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability, and its most likely alternatives when asked."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """New text of one generation: valid UTF-8, never part of a stop string."""

    request_id: str
    text: str
    index: int  # of this chunk's first token among the generated tokens
    token_ids: tuple[int, ...] = ()  # with include_token_ids
    segment_end: bool = False  # ends exactly at a sentence/clause boundary (sentence/clause chunking)
    logprobs: tuple[TokenLogprob, ...] = ()  # with logprobs / top_logprobs
    server_time_ms: int | None = None  # with timestamps


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Server-side timings in milliseconds."""

    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    decode_tokens_per_second: float


@dataclass(frozen=True)
class Summary:
    """How a generation ended (tokenwire.v1.Finished): what a Cancel reports."""

    reason: StopReason
    stop_sequence: str  # the stop string matched, or the stop token id as text; "" otherwise
    usage: Usage
    timings: Timings
    sent_text_chars: int  # characters sent in chunks: after a barge-in, what a listener may have heard
    sent_tokens: int
    tail_text: str  # generated but never sent (cut-off segment, partial stop string)


@dataclass(frozen=True)
class Result(Summary):
    """A finished generation: its Summary plus the text received and what the server started it with."""

    request_id: str
    text: str  # every chunk's text, joined
    seed: int | None  # the seed in use (replay with it)
    prompt_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class CancelResult:
    """The answer to `cancel`: whether a live request was found, and what it had produced."""

    found: bool
    summary: Summary | None


@dataclass(frozen=True)
class ModelInfo:
    model: str
    source: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    max_batch_size: int
    max_live_requests: int
    has_chat_template: bool
    server_version: str
    weights: str = ""  # "dense" or "q4_1"; empty from servers older than the field
    activations: str = ""  # what q4_1 layers multiply: "int8", "float32", "bfloat16"; empty when dense
    kv_cache_dtype: str = ""  # dtype, or "float16" beside "int8" activations


@dataclass(frozen=True)
class Tokens:
    """Token ids and the text of each token decoded alone."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)
