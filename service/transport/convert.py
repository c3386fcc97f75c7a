"""Protobuf <-> internal types at the service edge: validate what comes in, render what goes out."""

from __future__ import annotations

import math

import grpc

from tokenwire.service.engine.requests import (
    Chunking,
    Delta,
    ErrorCode,
    Failure,
    Finished,
    GenerationRequest,
    Output,
    OutputOptions,
    PromptInput,
    RequestError,
    RequestField,
    SamplingParams,
    SessionTruncation,
    Started,
    StoppingParams,
    StopReason,
    TokenLogprob,
)
from tokenwire.v1 import tokenwire_pb2 as pb

# Limits documented in tokenwire.proto.
MAX_ID_CHARS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_MIN_SEGMENT_CHARS = 1000
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0

_CHUNKING = {
    pb.CHUNKING_UNSPECIFIED: Chunking.TOKEN,
    pb.CHUNKING_TOKEN: Chunking.TOKEN,
    pb.CHUNKING_WORD: Chunking.WORD,
    pb.CHUNKING_SENTENCE: Chunking.SENTENCE,
    pb.CHUNKING_CLAUSE: Chunking.CLAUSE,
}
_STOP_REASON = {reason: pb.StopReason.Value(f"STOP_REASON_{reason.name}") for reason in StopReason}
_STATUS = {code: grpc.StatusCode[code.name] for code in ErrorCode}

# Where each field the engine names lives, relative to the message that carries the request: a Start
# in Generate (so "start." + path), the TokenizeRequest itself in Tokenize (its input and chat).
FIELD_PATHS: dict[RequestField, str] = {
    RequestField.REQUEST_ID: "request_id",
    RequestField.SESSION_ID: "session_id",
    RequestField.INPUT: "input",
    RequestField.CHAT: "chat",
    RequestField.CHAT_MESSAGES: "chat.messages",
    RequestField.PROMPT: "prompt",
    RequestField.TOKEN_IDS: "token_ids.ids",
    RequestField.STOP_TOKEN_IDS: "stopping.stop_token_ids",
    RequestField.MAX_TOKENS: "stopping.max_tokens",
}
START = "start"  # the path of a Generate request's fields
# Where a TokenizeRequest's fields differ from a Start's (at its root, "").
TOKENIZE_PATHS: dict[RequestField, str] = {RequestField.PROMPT: "text"}


class MessageError(RequestError):
    """A request refused by the transport's own checks of a message, at a .proto path (the engine's
    errors name a RequestField instead)."""

    def __init__(self, code: ErrorCode, message: str, path: str) -> None:
        super().__init__(code, message)
        self.path = path


def _invalid(path: str, message: str) -> MessageError:
    return MessageError(ErrorCode.INVALID_ARGUMENT, f"{path}: {message}", path)


# ---- in ----


def start_to_request(start: pb.Start) -> GenerationRequest:
    """Validate a Start and convert it; raises MessageError(INVALID_ARGUMENT) naming the field.

    Checks that need the model (vocabulary, context length, chat template) are the engine's."""
    if len(start.request_id) > MAX_ID_CHARS:
        raise _invalid("start.request_id", f"at most {MAX_ID_CHARS} characters")
    if len(start.session_id) > MAX_ID_CHARS:
        raise _invalid("start.session_id", f"at most {MAX_ID_CHARS} characters")
    if start.continue_session and not start.session_id:
        raise _invalid("start.continue_session", "needs a session_id: the session to continue")
    return GenerationRequest(
        request_id=start.request_id,
        input=_input(start),
        sampling=_sampling(start.sampling) if start.HasField("sampling") else SamplingParams(),
        stopping=_stopping(start.stopping) if start.HasField("stopping") else StoppingParams(),
        output=_output(start.output) if start.HasField("output") else OutputOptions(),
        session_id=start.session_id,
        truncation=_truncation(start.truncate_session) if start.HasField("truncate_session") else None,
        continue_session=start.continue_session,
    )


def _input(start: pb.Start) -> PromptInput:
    kind = start.WhichOneof("input")
    if kind == "prompt":
        if not start.prompt:
            raise _invalid("start.input", "prompt must not be empty")
        return PromptInput(text=start.prompt)
    if kind == "chat":
        return PromptInput(chat=chat_to_messages(start.chat, "start.chat"))
    if kind == "token_ids":
        if not start.token_ids.ids:
            raise _invalid("start.input", "token_ids needs at least one token id")
        return PromptInput(token_ids=tuple(start.token_ids.ids))
    raise _invalid("start.input", "exactly one of prompt, chat or token_ids is required")


def chat_to_messages(chat: pb.Chat, field: str) -> tuple[tuple[str, str], ...]:
    """(role, content) pairs; `field` is the Chat's path. Errors name the repeated field itself (a path
    without an index, so clients can match it) and give the index in the message."""
    if not chat.messages:
        raise _invalid(f"{field}.messages", "at least one message is required")
    for i, message in enumerate(chat.messages):
        if not message.role:
            raise _invalid(f"{field}.messages", f"messages[{i}] has no role")
    return tuple((m.role, m.content) for m in chat.messages)


def _float(value: float, field: str, low: float, high: float, *, low_open: bool = False) -> float:
    """Check a float against [low, high] (or (low, high]); NaN and infinities never pass."""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise _invalid(field, f"must be a finite number in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _sampling(sampling: pb.SamplingParams) -> SamplingParams:
    path = "start.sampling"
    defaults = SamplingParams()
    return SamplingParams(
        temperature=_float(sampling.temperature, f"{path}.temperature", 0.0, MAX_TEMPERATURE)
        if sampling.HasField("temperature")
        else defaults.temperature,
        top_k=sampling.top_k,  # uint32: never negative; 0 means no limit
        top_p=_float(sampling.top_p, f"{path}.top_p", 0.0, 1.0, low_open=True)
        if sampling.HasField("top_p")
        else defaults.top_p,
        min_p=_float(sampling.min_p, f"{path}.min_p", 0.0, 1.0)
        if sampling.HasField("min_p")
        else defaults.min_p,
        repetition_penalty=_float(
            sampling.repetition_penalty,
            f"{path}.repetition_penalty",
            0.0,
            MAX_REPETITION_PENALTY,
            low_open=True,
        )
        if sampling.HasField("repetition_penalty")
        else defaults.repetition_penalty,
        seed=sampling.seed if sampling.HasField("seed") else None,
    )


def _stopping(stopping: pb.StoppingParams) -> StoppingParams:
    path = "start.stopping"
    max_tokens = stopping.max_tokens if stopping.HasField("max_tokens") else None
    if max_tokens is not None and max_tokens < 1:
        raise _invalid(f"{path}.max_tokens", "must be at least 1 when set")
    min_tokens = stopping.min_tokens
    if max_tokens is not None and min_tokens > max_tokens:
        raise _invalid(f"{path}.min_tokens", f"{min_tokens} is more than max_tokens ({max_tokens})")
    if len(stopping.stop) > MAX_STOP_STRINGS:
        raise _invalid(f"{path}.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, stop in enumerate(stopping.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise _invalid(f"{path}.stop", f"stop[{i}] must have 1..{MAX_STOP_CHARS} characters")
    if len(stopping.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise _invalid(f"{path}.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token ids")
    limit_ms = stopping.time_limit_ms if stopping.HasField("time_limit_ms") else 0
    return StoppingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=tuple(stopping.stop),
        stop_token_ids=tuple(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos,
        time_limit_s=limit_ms / 1000.0 if limit_ms else None,
    )


def _output(output: pb.OutputOptions) -> OutputOptions:
    path = "start.output"
    # proto3 enums are open: a number this server does not know arrives as a plain int.
    chunking = _CHUNKING.get(output.chunking)
    if chunking is None:
        raise _invalid(f"{path}.chunking", f"unknown Chunking value {output.chunking}")
    if output.top_logprobs > MAX_TOP_LOGPROBS:
        raise _invalid(f"{path}.top_logprobs", f"must be in 0..{MAX_TOP_LOGPROBS}")
    if output.min_segment_chars > MAX_MIN_SEGMENT_CHARS:
        raise _invalid(f"{path}.min_segment_chars", f"at most {MAX_MIN_SEGMENT_CHARS}")
    return OutputOptions(
        chunking=chunking,
        logprobs=output.logprobs or output.top_logprobs > 0,
        top_logprobs=output.top_logprobs,
        token_ids=output.token_ids,
        timestamps=output.timestamps,
        min_segment_chars=output.min_segment_chars,
        fast_first_segment=output.fast_first_segment,
    )


def _truncation(truncation: pb.SessionTruncation) -> SessionTruncation:
    keep = truncation.WhichOneof("keep")
    if keep == "reply_chars":
        return SessionTruncation(reply_chars=truncation.reply_chars)
    if keep == "reply_tokens":
        return SessionTruncation(reply_tokens=truncation.reply_tokens)
    raise _invalid("start.truncate_session", "set reply_chars or reply_tokens")


def interrupt_after_segment(interrupt: pb.Interrupt) -> bool:
    """Whether the Interrupt asks to finish the current segment first; rejects unknown modes."""
    mode = interrupt.mode
    if mode not in (
        pb.INTERRUPT_MODE_UNSPECIFIED,
        pb.INTERRUPT_MODE_IMMEDIATE,
        pb.INTERRUPT_MODE_AFTER_SEGMENT,
    ):
        raise _invalid("interrupt.mode", f"unknown InterruptMode value {mode}")
    return mode == pb.INTERRUPT_MODE_AFTER_SEGMENT


# ---- out ----


def status_code(code: ErrorCode) -> grpc.StatusCode:
    return _STATUS[code]


def status_number(code: ErrorCode) -> int:
    """The google.rpc.Code number of a per-request error (INVALID_ARGUMENT = 3, ...)."""
    number: int = _STATUS[code].value[0]
    return number


def stop_reason_to_pb(reason: StopReason) -> pb.StopReason:
    return _STOP_REASON[reason]


def started_to_pb(started: Started) -> pb.Started:
    return pb.Started(
        prompt_tokens=started.prompt_tokens,
        cached_prompt_tokens=started.cached_prompt_tokens,
        seed=started.seed,
        max_tokens=started.max_tokens,
        queue_ms=_ms(started.queue_s),
    )


def _ms(seconds: float) -> float:
    """Milliseconds, to the microsecond the engine measures: 1.656, never 1.6560000000000001 (seconds
    times 1000 is not exact in binary, even for a duration already rounded to the microsecond)."""
    return round(seconds * 1000.0, 3)


def _logprob_to_pb(logprob: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=logprob.token_id,
        token=logprob.token,
        logprob=logprob.logprob,
        top=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in logprob.top],
    )


def delta_to_pb(delta: Delta, options: OutputOptions) -> pb.Chunk:
    """A Chunk with only what the request asked for (token ids, timestamps)."""
    return _chunk(delta, options, (0, 0), (len(delta.token_ids), len(delta.text)), delta.segment_end)


def _chunk(
    delta: Delta, options: OutputOptions, begin: tuple[int, int], end: tuple[int, int], segment_end: bool
) -> pb.Chunk:
    """The Chunk of the part of `delta` between two of its (tokens, characters) offsets."""
    (first, begin_char), (last, end_char) = begin, end
    chunk = pb.Chunk(text=delta.text[begin_char:end_char], index=delta.index + first, segment_end=segment_end)
    if options.token_ids:
        chunk.token_ids.extend(delta.token_ids[first:last])
    if delta.logprobs:
        chunk.logprobs.extend(_logprob_to_pb(lp) for lp in delta.logprobs[first:last])
    if options.timestamps:
        chunk.server_time_ms = int(delta.time * 1000)
    return chunk


def delta_to_pbs(delta: Delta, options: OutputOptions, max_bytes: int) -> list[pb.Chunk]:
    """The delta as Chunks of at most `max_bytes` each.

    A delta merged for a slow reader may hold thousands of tokens (with top_logprobs, hundreds of
    bytes each): sent whole it would pass the server's message size limit, and gRPC would end the
    whole stream. It is cut where the deltas it was merged from meet (`Delta.joins`), the places
    where each token is still in the chunk its text starts in; the pieces follow each other like the
    deltas would have (consecutive `index`, segment_end on the last only). A part too large by itself
    (one long sentence's tokens with top_logprobs) is cut between its tokens: its text goes with its
    first tokens, and the chunks after it carry the rest of its tokens with empty text."""
    whole = delta_to_pb(delta, options)
    if whole.ByteSize() <= max_bytes:
        return [whole]
    stops: list[tuple[int, int]] = []  # (tokens, characters) offsets where a chunk may end
    begin = (0, 0)
    for stop in [*delta.joins, (len(delta.token_ids), len(delta.text))]:
        if _chunk(delta, options, begin, stop, False).ByteSize() > max_bytes:
            stops.extend(_token_stops(delta, options, begin, stop, max_bytes))
        stops.append(stop)
        begin = stop
    cuts: list[tuple[int, int]] = []  # where each chunk but the first begins
    begin, size = (0, 0), 0
    for stop in stops:
        # Sizes add up: a piece's fields are the concatenation of its parts' (a length prefix of the
        # sum is never longer than the prefixes of the parts), so the sum bounds the piece.
        part = _chunk(delta, options, begin, stop, False).ByteSize()
        if size and size + part > max_bytes:
            cuts.append(begin)
            size = 0
        size += part
        begin = stop
    bounds = [(0, 0), *cuts, stops[-1]]
    last = len(bounds) - 2
    return [
        _chunk(delta, options, bounds[i], bounds[i + 1], delta.segment_end and i == last)
        for i in range(last + 1)
    ]


def _token_stops(
    delta: Delta, options: OutputOptions, begin: tuple[int, int], stop: tuple[int, int], max_bytes: int
) -> list[tuple[int, int]]:
    """Offsets between the tokens of one part of `delta` too large for a message, so that each run
    of its tokens fits (the first with all of the part's text: its end is every offset's character)."""
    (first, _), (last, end_char) = begin, stop
    stops = []
    size = _chunk(delta, options, begin, (first, end_char), False).ByteSize()  # the text
    for token in range(first, last):
        part = _chunk(delta, options, (token, end_char), (token + 1, end_char), False).ByteSize()
        if token > first and size + part > max_bytes:
            stops.append((token, end_char))
            size = 0
        size += part
    return stops


def finished_to_pb(finished: Finished) -> pb.Finished:
    usage, timings = finished.usage, finished.timings
    return pb.Finished(
        reason=stop_reason_to_pb(finished.reason),
        stop_sequence=finished.stop_sequence,
        usage=pb.Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_prompt_tokens=usage.cached_prompt_tokens,
        ),
        timings=pb.Timings(
            queue_ms=_ms(timings.queue_s),
            time_to_first_token_ms=_ms(timings.time_to_first_token_s),
            total_ms=_ms(timings.total_s),
            decode_tokens_per_second=round(timings.decode_tokens_per_second, 3),
        ),
        sent_text_chars=finished.sent_text_chars,
        sent_tokens=finished.sent_tokens,
        tail_text=finished.tail_text,
    )


def field_path(field: RequestField, root: str = START) -> str:
    """The .proto path of a field the engine names, in the message at `root` ("": the request itself)."""
    if not root:  # a TokenizeRequest: its text is not called prompt
        return TOKENIZE_PATHS.get(field, FIELD_PATHS[field])
    return f"{root}.{FIELD_PATHS[field]}"


def error_path(error: Failure | RequestError, root: str = START) -> str:
    """The .proto path at fault ("" when no one field is): what clients read in Error.field."""
    if isinstance(error, MessageError):
        return error.path
    return field_path(error.field, root) if error.field is not None else ""


def bare_message(error: Failure | RequestError, root: str = START) -> str:
    """The error's message without the field at fault in front (for a log line that names the field
    apart); `describe` is its inverse."""
    path = error_path(error, root)
    return error.message.removeprefix(f"{path}: ") if path else error.message


def describe(error: Failure | RequestError, root: str = START) -> str:
    """The error's message, led by the field at fault unless it already is (for a person
    reading a log or grpcurl output; programs read Error.field)."""
    path = error_path(error, root)
    if path and not error.message.startswith(f"{path}:"):
        return f"{path}: {error.message}"
    return error.message


def failure_to_pb(failure: Failure | RequestError) -> pb.Error:
    """A Generate response's Error (the request's fields are under `start`)."""
    return pb.Error(code=status_number(failure.code), message=describe(failure), field=error_path(failure))


# Room a GenerateResponse needs around its Chunk, besides the request id: tags and length prefixes,
# index, segment_end, server_time_ms (a few dozen bytes), with plenty to spare.
RESPONSE_OVERHEAD_BYTES = 256


def output_to_responses(
    request_id: str, output: Output, options: OutputOptions, max_message_bytes: int
) -> list[pb.GenerateResponse]:
    """One engine output as GenerateResponses of at most `max_message_bytes` each: a large merged
    delta becomes several chunks (see `delta_to_pbs`), anything else one response.

    Cut here rather than by capping the merging in RequestStream: only the transport knows the
    message limit, which fields the request asked for (token ids, timestamps) and their exact
    encoded size, where the engine could only guess at a byte budget."""
    if not isinstance(output, Delta):
        return [output_to_response(request_id, output, options)]
    room = max_message_bytes - len(request_id.encode()) - RESPONSE_OVERHEAD_BYTES
    return [
        pb.GenerateResponse(request_id=request_id, chunk=chunk)
        for chunk in delta_to_pbs(output, options, max(room, 1))
    ]


def output_to_response(request_id: str, output: Output, options: OutputOptions) -> pb.GenerateResponse:
    """Wrap one engine output of a request in a GenerateResponse."""
    if isinstance(output, Delta):
        return pb.GenerateResponse(request_id=request_id, chunk=delta_to_pb(output, options))
    if isinstance(output, Started):
        return pb.GenerateResponse(request_id=request_id, started=started_to_pb(output))
    if isinstance(output, Finished):
        return pb.GenerateResponse(request_id=request_id, finished=finished_to_pb(output))
    return pb.GenerateResponse(request_id=request_id, error=failure_to_pb(output))


def error_response(request_id: str, error: Failure | RequestError) -> pb.GenerateResponse:
    """The last message of a request that failed."""
    return pb.GenerateResponse(request_id=request_id, error=failure_to_pb(error))


def refusal_response(
    request_id: str, error: RequestError, refused: pb.Error.Refusal, message_index: int
) -> pb.GenerateResponse:
    """The answer to a request message that was refused (the `message_index`th on its stream): it
    ends nothing, so a live request with the same id is not mistaken for over."""
    response = error_response(request_id, error)
    response.error.refused = refused
    response.error.message_index = message_index
    return response
