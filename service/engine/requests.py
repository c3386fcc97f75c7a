"""Internal request and output types passed between the servicer, the engine and the scheduler.

Plain dataclasses: no grpc, no protobuf, no torch. The servicer converts protobuf to these at the
edge (and back), so everything below it can be tested without a network or a model. Fields are
named by `RequestField`, never by a .proto path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokenwire.service.model.types import SamplingParams


class Chunking(enum.Enum):
    """How generated text is cut into chunks."""

    TOKEN = "token"
    WORD = "word"
    SENTENCE = "sentence"
    CLAUSE = "clause"


class StopReason(enum.Enum):
    """Why a generation ended (mirrors tokenwire.v1.StopReason)."""

    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    DEADLINE = "deadline"  # the request's own time limit
    CONTEXT_LENGTH = "context_length"
    ERROR = "error"
    SHUTDOWN = "shutdown"  # the server stopped: the drain's grace period ran out, or it stopped at once


class ErrorCode(enum.Enum):
    """The gRPC status a per-request failure maps to (named like grpc.StatusCode)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class RequestField(enum.Enum):
    """A field of a request, in the engine's terms, named when it is at fault.

    The transport maps each to the path clients see in the contract (transport/convert.py)."""

    REQUEST_ID = "request_id"
    SESSION_ID = "session_id"
    INPUT = "input"  # the input as a whole: the prompt, chat or token ids, however given
    CHAT = "chat"
    CHAT_MESSAGES = "chat_messages"  # a chat's messages as a whole: how many, how long in all
    PROMPT = "prompt"  # the input's text: a Start's prompt, a Tokenize request's text
    TOKEN_IDS = "token_ids"
    STOP_TOKEN_IDS = "stop_token_ids"
    MAX_TOKENS = "max_tokens"


class RequestError(Exception):
    """A request that cannot be served, with the status code and the field at fault (None: no one field)."""

    def __init__(self, code: ErrorCode, message: str, field: RequestField | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True)
class StoppingParams:
    """When a generation ends. max_tokens None means: as many as the context allows."""

    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    time_limit_s: float | None = None


@dataclass(frozen=True)
class OutputOptions:
    """What outputs carry and how text is chunked."""

    chunking: Chunking = Chunking.TOKEN
    logprobs: bool = False
    top_logprobs: int = 0
    token_ids: bool = False
    timestamps: bool = False
    min_segment_chars: int = 0
    fast_first_segment: bool = False


@dataclass(frozen=True)
class SessionTruncation:
    """Cut a session's last reply to what was heard: by characters or by tokens (one of them)."""

    reply_chars: int | None = None
    reply_tokens: int | None = None


@dataclass(frozen=True)
class PromptInput:
    """What to continue: exactly one of text, chat messages (role, content) or token ids."""

    text: str | None = None
    chat: tuple[tuple[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass
class GenerationRequest:
    """One generation as the engine sees it. The engine tokenizes `input` (with the session's history
    when session_id is set) into prompt_token_ids."""

    request_id: str
    input: PromptInput
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    output: OutputOptions = field(default_factory=OutputOptions)
    session_id: str = ""
    truncation: SessionTruncation | None = None
    continue_session: bool = False  # refuse (NOT_FOUND) rather than start a new history
    prompt_token_ids: list[int] = field(default_factory=list)
    # The principal (caller) the request belongs to: request ids and session ids are its own names,
    # so another principal can neither reach nor probe them. "" is the anonymous principal.
    owner: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """The request id in its owner's namespace."""
        return (self.owner, self.request_id)

    @property
    def session_key(self) -> tuple[str, str]:
        """The session id in its owner's namespace."""
        return (self.owner, self.session_id)


# ---- outputs, in the order a request produces them: Started, Delta*, then Finished or Failure ----


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    cached_prompt_tokens: int
    seed: int
    max_tokens: int
    queue_s: float = 0.0  # from the request's arrival to its admission (or its end, if never admitted)


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass
class Delta:
    """New text for the client. Deltas waiting for a slow reader are merged (see `merge`)."""

    text: str
    token_ids: list[int]
    index: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    segment_end: bool = False
    time: float = 0.0  # wall-clock seconds since the epoch when it was produced
    # Where merged deltas meet, as (tokens, characters) from this delta's start: the places it can be
    # cut again and still give each token to the chunk its text starts in (see `merge`).
    joins: list[tuple[int, int]] = field(default_factory=list)

    def merge(self, later: Delta) -> None:
        """Append a later delta to this one (its tokens follow this one's). Where they meet is kept
        in `joins`, so the transport can cut the result into several chunks again when one would be
        larger than a message may be."""
        tokens, chars = len(self.token_ids), len(self.text)
        self.joins.append((tokens, chars))
        self.joins.extend((tokens + t, chars + c) for t, c in later.joins)
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        self.logprobs.extend(later.logprobs)
        self.segment_end = later.segment_end
        self.time = later.time


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    queue_s: float = 0.0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    decode_tokens_per_second: float = 0.0


@dataclass(frozen=True)
class Finished:
    reason: StopReason
    stop_sequence: str = ""
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    sent_text_chars: int = 0
    sent_tokens: int = 0
    tail_text: str = ""


@dataclass(frozen=True)
class Failure:
    code: ErrorCode
    message: str
    field: RequestField | None = None


Output = Started | Delta | Finished | Failure


# ---- other answers ----


@dataclass(frozen=True)
class Tokenized:
    """Token ids of a text or chat, with each token's text."""

    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model and what the engine runs it with, as plain values."""

    name: str
    source: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    weights: str  # "dense", or the block format the linear layers run on (see Runner.weights)
    activations: str
    kv_cache_dtype: str
    has_chat_template: bool
    max_batch_size: int  # what the engine runs at once: its configured batch within the runner's rows
    max_live_requests: int
