"""Protobuf <-> internal conversion: tables of valid and invalid Starts, and every output mapping."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from tokenwire.service.engine.requests import (
    Chunking,
    Delta,
    ErrorCode,
    Failure,
    Finished,
    RequestError,
    RequestField,
    SessionTruncation,
    Started,
    StopReason,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tokenwire.service.engine.requests import OutputOptions as Options
from tokenwire.service.transport import convert
from tokenwire.v1 import tokenwire_pb2 as pb


def start(**fields: Any) -> pb.Start:
    fields.setdefault("prompt", "hi")
    return pb.Start(**fields)


def test_full_start_converts() -> None:
    request = convert.start_to_request(
        pb.Start(
            request_id="r1",
            chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hello")]),
            sampling=pb.SamplingParams(
                temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=2**64 - 1
            ),
            stopping=pb.StoppingParams(
                max_tokens=32,
                min_tokens=2,
                stop=["\n\n"],
                stop_token_ids=[7],
                ignore_eos=True,
                time_limit_ms=1500,
            ),
            output=pb.OutputOptions(
                chunking=pb.CHUNKING_SENTENCE,
                top_logprobs=3,
                token_ids=True,
                timestamps=True,
                min_segment_chars=20,
                fast_first_segment=True,
            ),
            session_id="conv",
            truncate_session=pb.SessionTruncation(reply_chars=12),
        )
    )
    assert request.request_id == "r1"
    assert request.input.chat == (("user", "hello"),) and request.input.text is None
    s = request.sampling
    assert (s.top_k, s.seed) == (40, 2**64 - 1)
    assert math.isclose(s.temperature, 0.7, rel_tol=1e-6) and math.isclose(s.top_p, 0.9, rel_tol=1e-6)
    assert math.isclose(s.min_p, 0.05, rel_tol=1e-6) and math.isclose(s.repetition_penalty, 1.1, rel_tol=1e-6)
    st = request.stopping
    assert (st.max_tokens, st.min_tokens, st.stop, st.stop_token_ids, st.ignore_eos) == (
        32,
        2,
        ("\n\n",),
        (7,),
        True,
    )
    assert st.time_limit_s == pytest.approx(1.5)
    o = request.output
    assert o.chunking is Chunking.SENTENCE and o.logprobs and o.top_logprobs == 3
    assert (o.token_ids, o.timestamps, o.min_segment_chars, o.fast_first_segment) == (True, True, 20, True)
    assert request.session_id == "conv" and request.truncation == SessionTruncation(reply_chars=12)


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        (
            {},
            lambda r: (
                r.sampling.greedy and r.stopping.max_tokens is None and r.output.chunking is Chunking.TOKEN
            ),
        ),
        ({"token_ids": pb.TokenIds(ids=[5, 6])}, lambda r: r.input.token_ids == (5, 6)),
        (
            {"sampling": pb.SamplingParams(temperature=0)},
            lambda r: r.sampling.greedy and r.sampling.seed is None,
        ),
        (
            {"sampling": pb.SamplingParams(temperature=100, top_p=1, min_p=1)},
            lambda r: r.sampling.temperature == 100,
        ),
        ({"sampling": pb.SamplingParams(seed=0)}, lambda r: r.sampling.seed == 0),
        ({"stopping": pb.StoppingParams(time_limit_ms=0)}, lambda r: r.stopping.time_limit_s is None),
        ({"stopping": pb.StoppingParams(min_tokens=5)}, lambda r: r.stopping.min_tokens == 5),
        ({"stopping": pb.StoppingParams(max_tokens=1, min_tokens=1)}, lambda r: r.stopping.max_tokens == 1),
        ({"stopping": pb.StoppingParams(stop=["x" * 256] * 16)}, lambda r: len(r.stopping.stop) == 16),
        (
            {"output": pb.OutputOptions(chunking=pb.CHUNKING_UNSPECIFIED)},
            lambda r: r.output.chunking is Chunking.TOKEN,
        ),
        (
            {"output": pb.OutputOptions(chunking=pb.CHUNKING_CLAUSE)},
            lambda r: r.output.chunking is Chunking.CLAUSE,
        ),
        (
            {"output": pb.OutputOptions(chunking=pb.CHUNKING_WORD)},
            lambda r: r.output.chunking is Chunking.WORD,
        ),
        (
            {"output": pb.OutputOptions(logprobs=True)},
            lambda r: r.output.logprobs and r.output.top_logprobs == 0,
        ),
        ({"output": pb.OutputOptions(top_logprobs=20)}, lambda r: r.output.logprobs),
        (
            {"truncate_session": pb.SessionTruncation(reply_tokens=0)},
            lambda r: r.truncation.reply_tokens == 0,
        ),
        ({"request_id": "x" * 128, "session_id": "s" * 128}, lambda r: len(r.request_id) == 128),
        (
            {"chat": pb.Chat(messages=[pb.ChatMessage(role="user")])},
            lambda r: r.input.chat == (("user", ""),),
        ),
    ],
)
def test_valid_starts(fields: dict[str, Any], check: Any) -> None:
    if {"token_ids", "chat"} & fields.keys():
        fields["prompt"] = None
        fields = {k: v for k, v in fields.items() if v is not None}
        request = convert.start_to_request(pb.Start(**fields))
    else:
        request = convert.start_to_request(start(**fields))
    assert check(request)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.Start(), "start.input"),
        (pb.Start(prompt=""), "start.input"),
        (pb.Start(token_ids=pb.TokenIds()), "start.input"),
        (pb.Start(chat=pb.Chat()), "start.chat.messages"),
        (pb.Start(chat=pb.Chat(messages=[pb.ChatMessage(content="no role")])), "start.chat.messages"),
        (start(request_id="x" * 129), "start.request_id"),
        (start(session_id="s" * 129), "start.session_id"),
        (start(sampling=pb.SamplingParams(temperature=-0.1)), "start.sampling.temperature"),
        (start(sampling=pb.SamplingParams(temperature=100.5)), "start.sampling.temperature"),
        (start(sampling=pb.SamplingParams(temperature=NAN)), "start.sampling.temperature"),
        (start(sampling=pb.SamplingParams(temperature=INF)), "start.sampling.temperature"),
        (start(sampling=pb.SamplingParams(top_p=0)), "start.sampling.top_p"),
        (start(sampling=pb.SamplingParams(top_p=1.01)), "start.sampling.top_p"),
        (start(sampling=pb.SamplingParams(top_p=NAN)), "start.sampling.top_p"),
        (start(sampling=pb.SamplingParams(min_p=-0.01)), "start.sampling.min_p"),
        (start(sampling=pb.SamplingParams(min_p=1.5)), "start.sampling.min_p"),
        (start(sampling=pb.SamplingParams(repetition_penalty=0)), "start.sampling.repetition_penalty"),
        (start(sampling=pb.SamplingParams(repetition_penalty=10.5)), "start.sampling.repetition_penalty"),
        (start(sampling=pb.SamplingParams(repetition_penalty=-INF)), "start.sampling.repetition_penalty"),
        (start(stopping=pb.StoppingParams(max_tokens=0)), "start.stopping.max_tokens"),
        (start(stopping=pb.StoppingParams(max_tokens=3, min_tokens=4)), "start.stopping.min_tokens"),
        (start(stopping=pb.StoppingParams(stop=["a"] * 17)), "start.stopping.stop"),
        (start(stopping=pb.StoppingParams(stop=["ok", ""])), "start.stopping.stop"),
        (start(stopping=pb.StoppingParams(stop=["x" * 257])), "start.stopping.stop"),
        (start(stopping=pb.StoppingParams(stop_token_ids=list(range(65)))), "start.stopping.stop_token_ids"),
        (start(output=pb.OutputOptions(chunking=99)), "start.output.chunking"),  # type: ignore[arg-type]
        (start(output=pb.OutputOptions(chunking=-1)), "start.output.chunking"),  # type: ignore[arg-type]
        (start(output=pb.OutputOptions(top_logprobs=21)), "start.output.top_logprobs"),
        (start(output=pb.OutputOptions(min_segment_chars=1001)), "start.output.min_segment_chars"),
        (start(truncate_session=pb.SessionTruncation()), "start.truncate_session"),
    ],
)
def test_invalid_starts_name_their_field(message: pb.Start, field: str) -> None:
    with pytest.raises(RequestError) as caught:
        convert.start_to_request(message)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert convert.error_path(caught.value) == field
    assert field in caught.value.message  # the message names the field for a person, too


@pytest.mark.parametrize(
    ("mode", "after_segment"),
    [
        (pb.INTERRUPT_MODE_UNSPECIFIED, False),
        (pb.INTERRUPT_MODE_IMMEDIATE, False),
        (pb.INTERRUPT_MODE_AFTER_SEGMENT, True),
    ],
)
def test_interrupt_modes(mode: int, after_segment: bool) -> None:
    assert convert.interrupt_after_segment(pb.Interrupt(request_id="r", mode=mode)) is after_segment  # type: ignore[arg-type]


def test_unknown_interrupt_mode() -> None:
    with pytest.raises(RequestError) as caught:
        convert.interrupt_after_segment(pb.Interrupt(request_id="r", mode=7))  # type: ignore[arg-type]
    assert convert.error_path(caught.value) == "interrupt.mode"


@pytest.mark.parametrize(
    ("code", "number"),
    [
        (ErrorCode.INVALID_ARGUMENT, 3),
        (ErrorCode.NOT_FOUND, 5),
        (ErrorCode.ALREADY_EXISTS, 6),
        (ErrorCode.RESOURCE_EXHAUSTED, 8),
        (ErrorCode.FAILED_PRECONDITION, 9),
        (ErrorCode.INTERNAL, 13),
        (ErrorCode.UNAVAILABLE, 14),
    ],
)
def test_error_codes_are_grpc_status_numbers(code: ErrorCode, number: int) -> None:
    assert convert.status_number(code) == number
    assert convert.status_code(code) == grpc.StatusCode[code.name]
    error = convert.failure_to_pb(Failure(code, "why", RequestField.MAX_TOKENS))
    path = "start.stopping.max_tokens"
    assert (error.code, error.message, error.field) == (number, f"{path}: why", path)


@pytest.mark.parametrize(
    ("reason", "value"),
    [
        (StopReason.MAX_TOKENS, pb.STOP_REASON_MAX_TOKENS),
        (StopReason.EOS, pb.STOP_REASON_EOS),
        (StopReason.STOP_SEQUENCE, pb.STOP_REASON_STOP_SEQUENCE),
        (StopReason.CANCELLED, pb.STOP_REASON_CANCELLED),
        (StopReason.INTERRUPTED, pb.STOP_REASON_INTERRUPTED),
        (StopReason.DEADLINE, pb.STOP_REASON_DEADLINE),
        (StopReason.CONTEXT_LENGTH, pb.STOP_REASON_CONTEXT_LENGTH),
        (StopReason.ERROR, pb.STOP_REASON_ERROR),
    ],
)
def test_stop_reasons(reason: StopReason, value: int) -> None:
    assert convert.stop_reason_to_pb(reason) == value


def test_finished_to_pb() -> None:
    finished = Finished(
        reason=StopReason.STOP_SEQUENCE,
        stop_sequence="END",
        usage=Usage(prompt_tokens=5, completion_tokens=9, cached_prompt_tokens=2),
        timings=Timings(
            queue_s=0.001, time_to_first_token_s=0.02, total_s=0.5, decode_tokens_per_second=40.0
        ),
        sent_text_chars=31,
        sent_tokens=8,
        tail_text="EN",
    )
    message = convert.finished_to_pb(finished)
    assert message.reason == pb.STOP_REASON_STOP_SEQUENCE and message.stop_sequence == "END"
    assert (
        message.usage.prompt_tokens,
        message.usage.completion_tokens,
        message.usage.cached_prompt_tokens,
    ) == (5, 9, 2)
    assert message.timings.queue_ms == pytest.approx(1.0)
    assert message.timings.time_to_first_token_ms == pytest.approx(20.0)
    assert message.timings.total_ms == pytest.approx(500.0)
    assert message.timings.decode_tokens_per_second == 40.0
    assert (message.sent_text_chars, message.sent_tokens, message.tail_text) == (31, 8, "EN")


def test_times_are_sent_to_the_microsecond() -> None:
    """Milliseconds with at most three decimals: JSON shows 1.656, not 1.656249999996362."""
    started = convert.started_to_pb(Started(3, 0, 1, 10, queue_s=0.001656249999996362))
    timings = Timings(
        queue_s=0.001656249999996362,
        time_to_first_token_s=0.0173000000000001,
        total_s=1.2345678999,
        decode_tokens_per_second=342.712345678,
    )
    finished = convert.finished_to_pb(Finished(StopReason.EOS, timings=timings))
    assert started.queue_ms == 1.656
    assert finished.timings.queue_ms == 1.656
    assert finished.timings.time_to_first_token_ms == 17.3
    assert finished.timings.total_ms == 1234.568
    assert finished.timings.decode_tokens_per_second == 342.712
    shown = json_format.MessageToJson(finished, indent=None)
    assert '"queueMs": 1.656,' in shown and '"totalMs": 1234.568,' in shown, shown


DELTA = Delta(
    text="Hi.",
    token_ids=[4, 5],
    index=3,
    logprobs=[TokenLogprob(4, "Hi", -0.25, (TopLogprob(4, "Hi", -0.25), TopLogprob(9, "Yo", -2.0)))],
    segment_end=True,
    time=1_700_000_000.123,
)


@pytest.mark.parametrize(
    ("options", "token_ids", "server_time_ms"),
    [
        (Options(), [], 0),
        (Options(token_ids=True), [4, 5], 0),
        (Options(timestamps=True), [], 1_700_000_000_123),
        (Options(token_ids=True, timestamps=True), [4, 5], 1_700_000_000_123),
    ],
)
def test_delta_to_pb_sends_only_what_was_asked(
    options: Options, token_ids: list[int], server_time_ms: int
) -> None:
    chunk = convert.delta_to_pb(DELTA, options)
    assert (chunk.text, chunk.index, chunk.segment_end) == ("Hi.", 3, True)
    assert list(chunk.token_ids) == token_ids
    assert chunk.server_time_ms == server_time_ms
    assert [(t.token_id, t.token) for t in chunk.logprobs[0].top] == [(4, "Hi"), (9, "Yo")]
    assert chunk.logprobs[0].logprob == -0.25


def test_output_to_response_kinds() -> None:
    opts = Options()
    assert convert.output_to_response("a", Started(3, 1, 42, 100), opts).started.seed == 42
    assert convert.output_to_response("a", DELTA, opts).chunk.text == "Hi."
    assert (
        convert.output_to_response("a", Finished(StopReason.EOS), opts).finished.reason == pb.STOP_REASON_EOS
    )
    response = convert.output_to_response("a", Failure(ErrorCode.INTERNAL, "boom"), opts)
    assert response.request_id == "a" and response.error.code == 13


# ---- the engine's fields, as clients see them ----


def _resolves(descriptor: Any, path: str) -> bool:
    """Whether a dotted path names a field (or oneof) of the message `descriptor`, through sub-messages."""
    head, _, rest = path.partition(".")
    if not rest:
        return head in descriptor.fields_by_name or head in descriptor.oneofs_by_name
    field = descriptor.fields_by_name.get(head)
    return field is not None and field.message_type is not None and _resolves(field.message_type, rest)


@pytest.mark.parametrize("field", list(RequestField))
def test_every_request_field_has_a_path_in_the_contract(field: RequestField) -> None:
    path = convert.field_path(field)
    assert path.startswith("start.") and _resolves(pb.Start.DESCRIPTOR, path.removeprefix("start."))
    assert _resolves(pb.GenerateRequest.DESCRIPTOR, path)


def test_tokenize_reports_its_fields_at_the_request_root() -> None:
    """Tokenize's errors name fields of the TokenizeRequest itself: no "start." in front."""
    for field in (RequestField.INPUT, RequestField.CHAT):
        assert _resolves(pb.TokenizeRequest.DESCRIPTOR, convert.field_path(field, root=""))
    error = RequestError(ErrorCode.INVALID_ARGUMENT, "cannot apply the chat template: no", RequestField.CHAT)
    assert convert.describe(error, root="") == "chat: cannot apply the chat template: no"
    assert convert.describe(error) == "start.chat: cannot apply the chat template: no"


@pytest.mark.parametrize(
    ("error", "path", "message"),
    [
        (
            RequestError(ErrorCode.INVALID_ARGUMENT, "the input is empty", RequestField.INPUT),
            "start.input",
            "start.input: the input is empty",
        ),
        (
            RequestError(ErrorCode.INVALID_ARGUMENT, "token id 9 is outside", RequestField.TOKEN_IDS),
            "start.token_ids.ids",
            "start.token_ids.ids: token id 9 is outside",
        ),
        (
            RequestError(ErrorCode.ALREADY_EXISTS, "request_id 'a' is already live", RequestField.REQUEST_ID),
            "start.request_id",
            "start.request_id: request_id 'a' is already live",
        ),
        (RequestError(ErrorCode.RESOURCE_EXHAUSTED, "full"), "", "full"),
        (convert.MessageError(ErrorCode.NOT_FOUND, "interrupt.request_id: no", "interrupt.request_id"),
         "interrupt.request_id", "interrupt.request_id: no"),
    ],
)  # fmt: skip
def test_errors_carry_the_path_clients_read(error: RequestError, path: str, message: str) -> None:
    described = convert.failure_to_pb(error)
    assert (described.field, described.message) == (path, message)


def test_a_merged_delta_too_large_for_a_message_is_cut_where_its_deltas_met() -> None:
    tops = tuple(TopLogprob(t, f"<{t}>", -1.0) for t in range(20))
    parts = [
        Delta(
            f"w{i}é ", [i, 100 + i], 10 + 2 * i, [TokenLogprob(j, f"t{j}", -0.5, tops) for j in (i, 100 + i)]
        )
        for i in range(50)
    ]
    parts[-1].segment_end = True
    merged = Delta("", [], 10)
    for part in parts:
        merged.merge(part)
    options = Options(logprobs=True, top_logprobs=20, token_ids=True)
    limit = 4096
    responses = convert.output_to_responses("r" * 128, merged, options, limit)
    assert convert.delta_to_pb(merged, options).ByteSize() > 3 * limit  # it must be cut
    assert len(responses) > 3 and all(r.ByteSize() <= limit for r in responses)
    chunks = [r.chunk for r in responses]
    assert "".join(c.text for c in chunks) == merged.text
    assert [t for c in chunks for t in c.token_ids] == merged.token_ids
    covered = 10
    for chunk in chunks:
        assert chunk.index == covered and chunk.text.endswith(" ")  # cut where two deltas met
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
        covered += len(chunk.token_ids)
    assert [c.segment_end for c in chunks] == [False] * (len(chunks) - 1) + [True]
    # Small enough: one response, as before.
    assert len(convert.output_to_responses("r", merged, options, 1 << 20)) == 1


def test_a_single_delta_too_large_for_a_message_is_cut_between_its_tokens() -> None:
    """One long sentence's tokens with top_logprobs (a sentence-chunked reply that never ended its
    sentence): the text goes with the first tokens, the rest follow in chunks with empty text."""
    tops = tuple(TopLogprob(t, f"<{t}>", -1.0) for t in range(20))
    ids = list(range(400))
    sentence = Delta(
        "a run-on sentence " * 100, ids, 7, [TokenLogprob(t, "x", -0.5, tops) for t in ids], segment_end=True
    )
    options = Options(logprobs=True, top_logprobs=20, token_ids=True)
    limit = 8 * 1024
    assert convert.delta_to_pb(sentence, options).ByteSize() > 8 * limit
    chunks = [r.chunk for r in convert.output_to_responses("r", sentence, options, limit)]
    assert len(chunks) > 8 and all(c.ByteSize() <= limit for c in chunks)
    assert chunks[0].text == sentence.text and all(c.text == "" for c in chunks[1:])
    assert [t for c in chunks for t in c.token_ids] == ids
    assert [lp.token_id for c in chunks for lp in c.logprobs] == ids
    assert [c.index for c in chunks] == [
        7 + sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))
    ]
    assert [c.segment_end for c in chunks] == [False] * (len(chunks) - 1) + [True]
