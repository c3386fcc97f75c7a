"""Protobuf at the client's edge: options to Start/Interrupt messages, responses to typed values."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1.metadata import REPLICA_HEADER

from ._errors import InvalidArgument, TokenWireError, error_for, status_code
from ._types import (
    CancelResult,
    Chunk,
    Chunking,
    GenerateOptions,
    HealthStatus,
    InterruptMode,
    Message,
    MessageLike,
    ModelInfo,
    Result,
    StopReason,
    Summary,
    Timings,
    TokenLogprob,
    Tokens,
    TopLogprob,
    Usage,
)

_OPTION_NAMES = frozenset(GenerateOptions.__optional_keys__)
_STOP_REASONS = {pb.StopReason.Value(f"STOP_REASON_{r.name}"): r for r in StopReason}
_HEALTH = {
    0: HealthStatus.UNKNOWN,
    1: HealthStatus.SERVING,
    2: HealthStatus.NOT_SERVING,
    3: HealthStatus.SERVICE_UNKNOWN,
}


def new_request_id() -> str:
    """A client-chosen id, so the caller knows it (to interrupt or cancel) before the server answers."""
    return uuid.uuid4().hex


# ---- out ----


def check_options(options: Mapping[str, object], caller: str) -> None:
    """TypedDict keywords are not checked at run time: refuse a misspelt option instead of ignoring it."""
    unknown = sorted(set(options) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")


def message_to_pb(message: MessageLike) -> pb.ChatMessage:
    if isinstance(message, Message):
        return pb.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, Mapping):
        return pb.ChatMessage(role=message["role"], content=message.get("content", ""))
    role, content = message
    return pb.ChatMessage(role=role, content=content)


def chat_to_pb(messages: Sequence[MessageLike]) -> pb.Chat:
    return pb.Chat(messages=[message_to_pb(m) for m in messages])


def build_start(request_id: str, prompt: str | None, options: GenerateOptions) -> pb.Start:
    """The Start message for a generation. Values are checked by the server, not here, so that every
    refusal comes back the same way (InvalidArgument naming the field)."""
    messages = options.get("messages")
    token_ids = options.get("token_ids")
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
        if value is not None
    ]
    if len(given) != 1:
        raise InvalidArgument("give exactly one of prompt, messages or token_ids", field="start.input")
    start = pb.Start(
        request_id=request_id,
        session_id=options.get("session_id") or "",
        continue_session=bool(options.get("continue_session")),
    )
    if prompt is not None:
        start.prompt = prompt
    elif messages is not None:
        start.chat.CopyFrom(chat_to_pb(messages))
    elif token_ids is not None:
        start.token_ids.ids.extend(token_ids)

    sampling = pb.SamplingParams()
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        value = options.get(name)
        if value is not None:  # optional fields: only a set one overrides the server's default
            setattr(sampling, name, value)
    if sampling.ListFields():
        start.sampling.CopyFrom(sampling)

    stop = options.get("stop")
    stopping = pb.StoppingParams(
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        stop_token_ids=list(options.get("stop_token_ids") or ()),
        ignore_eos=bool(options.get("ignore_eos")),
    )
    for name in ("max_tokens", "min_tokens", "time_limit_ms"):
        value = options.get(name)
        if value is not None:
            setattr(stopping, name, value)
    if stopping.ListFields():
        start.stopping.CopyFrom(stopping)

    chunking = options.get("chunking")
    output = pb.OutputOptions(
        chunking=pb.Chunking.Value(f"CHUNKING_{Chunking(chunking).name}")
        if chunking
        else pb.CHUNKING_UNSPECIFIED,
        logprobs=bool(options.get("logprobs")),
        top_logprobs=options.get("top_logprobs") or 0,
        token_ids=bool(options.get("include_token_ids")),
        timestamps=bool(options.get("timestamps")),
        min_segment_chars=options.get("min_segment_chars") or 0,
        fast_first_segment=bool(options.get("fast_first_segment")),
    )
    if output.ListFields():
        start.output.CopyFrom(output)

    chars, tokens = options.get("truncate_reply_chars"), options.get("truncate_reply_tokens")
    if chars is not None:
        start.truncate_session.reply_chars = chars
    elif tokens is not None:
        start.truncate_session.reply_tokens = tokens
    return start


# Sent on a quiet request side so that a proxy keeps the stream open; the server ignores it.
HEARTBEAT_REQUEST = pb.GenerateRequest(heartbeat=pb.Heartbeat())


def is_heartbeat(response: pb.GenerateResponse) -> bool:
    """The server's keep-alive on a quiet stream: part of no generation, never shown as a chunk."""
    return response.WhichOneof("kind") == "heartbeat"


def replica_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The replica named in a Generate call's initial metadata (None when the server has no id)."""
    for key, value in metadata or ():
        if key == REPLICA_HEADER:
            return value if isinstance(value, str) else value.decode()
    return None


def build_interrupt(request_id: str, mode: InterruptMode | str) -> pb.GenerateRequest:
    value = pb.InterruptMode.Value(f"INTERRUPT_MODE_{InterruptMode(mode).name}")
    return pb.GenerateRequest(interrupt=pb.Interrupt(request_id=request_id, mode=value))


# ---- in ----


def chunk_from_pb(request_id: str, chunk: pb.Chunk) -> Chunk:
    return Chunk(
        request_id=request_id,
        text=chunk.text,
        index=chunk.index,
        token_ids=tuple(chunk.token_ids),
        segment_end=chunk.segment_end,
        logprobs=tuple(
            TokenLogprob(
                lp.token_id,
                lp.token,
                lp.logprob,
                tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in lp.top),
            )
            for lp in chunk.logprobs
        ),
        server_time_ms=chunk.server_time_ms or None,
    )


def summary_from_pb(finished: pb.Finished) -> Summary:
    usage, timings = finished.usage, finished.timings
    return Summary(
        reason=_STOP_REASONS.get(finished.reason, StopReason.UNSPECIFIED),
        stop_sequence=finished.stop_sequence,
        usage=Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens),
        timings=Timings(
            timings.queue_ms,
            timings.time_to_first_token_ms,
            timings.total_ms,
            timings.decode_tokens_per_second,
        ),
        sent_text_chars=finished.sent_text_chars,
        sent_tokens=finished.sent_tokens,
        tail_text=finished.tail_text,
    )


def cancel_result_from_pb(response: pb.CancelResponse) -> CancelResult:
    summary = summary_from_pb(response.summary) if response.HasField("summary") else None
    return CancelResult(found=response.found, summary=summary)


def model_info_from_pb(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=info.model,
        source=info.source,
        context_length=info.context_length,
        vocab_size=info.vocab_size,
        eos_token_ids=tuple(info.eos_token_ids),
        device=info.device,
        dtype=info.dtype,
        max_batch_size=info.max_batch_size,
        max_live_requests=info.max_live_requests,
        has_chat_template=info.has_chat_template,
        server_version=info.server_version,
        weights=info.weights,
        activations=info.activations,
        kv_cache_dtype=info.kv_cache_dtype,
    )


def tokens_from_pb(response: pb.TokenizeResponse) -> Tokens:
    return Tokens(ids=tuple(response.token_ids), tokens=tuple(response.tokens))


def health_from_number(status: int) -> HealthStatus:
    return _HEALTH.get(status, HealthStatus.UNKNOWN)


def answers_interrupt(error: pb.Error) -> bool:
    """Whether an Error refuses an Interrupt (and so ends no request). Servers before Error.refused
    are known by the field path."""
    return error.refused == pb.Error.REFUSAL_INTERRUPT or error.field.startswith("interrupt.")


def error_from_pb(request_id: str, error: pb.Error) -> TokenWireError:
    return error_for(status_code(error.code), error.message, field=error.field, request_id=request_id)


class RequestState:
    """Folds one generation's responses (Started, Chunk*, Finished | Error) into Chunks and a Result.

    Pure: the async and sync clients feed it from their reader and hand out what it returns."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started: pb.Started | None = None
        self._parts: list[str] = []

    def feed(self, response: pb.GenerateResponse) -> Chunk | Result | TokenWireError | None:
        """The typed event for one response: None for Started, a Result or an error at the end."""
        kind = response.WhichOneof("kind")
        if kind == "started":
            self.started = response.started
            return None
        if kind == "chunk":
            self._parts.append(response.chunk.text)
            return chunk_from_pb(self.request_id, response.chunk)
        if kind == "finished":
            started = self.started
            return Result(
                **vars(summary_from_pb(response.finished)),
                request_id=self.request_id,
                text="".join(self._parts),
                seed=started.seed if started is not None else None,
                prompt_tokens=started.prompt_tokens if started is not None else 0,
                cached_prompt_tokens=started.cached_prompt_tokens if started is not None else 0,
            )
        if kind == "error":
            return error_from_pb(self.request_id, response.error)
        return None  # a kind this client does not know (a newer server): skip it
