"""Hypothesis over every request message: each case gets its proper answer and the server never falls over.

The Generate cases share one stream (reopened only after an oversize message ends it), so thousands of
cases run in minutes. Each case's Starts are judged by the oracle in hostile_requests.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_runner import FakeRunner
from tests.reliability.conftest import FUZZ_MESSAGE_BYTES, BackgroundServer
from tests.reliability.contract import (
    INVALID,
    NOT_FOUND,
    by_request,
    check_error,
    check_generation,
    kind,
    read_rest,
    read_until_done,
    split_runs,
    start,
)
from tests.reliability.hostile_requests import (
    ANY_CHAT,
    ANY_TEXT,
    BAD_ID,
    TEXT,
    cases,
    check_run,
    judge,
    printable_id,
)
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

# ---- driving a case over the shared stream ----


@dataclasses.dataclass
class Tally:
    cases: int = 0
    messages: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    reopened: int = 0


class FuzzStream:
    """The one Generate stream the cases share; reopened when an oversize message ends it."""

    def __init__(self, server: BackgroundServer) -> None:
        self.server = server
        self.channel: grpc.aio.Channel | None = None
        self.call: grpc.aio.StreamStreamCall | None = None
        self.tally = Tally()

    async def _open(self) -> grpc.aio.StreamStreamCall:
        if self.call is None:
            if self.channel is None:
                self.channel = grpc.aio.insecure_channel(self.server.server.address)
            self.call = pb_grpc.TokenWireStub(self.channel).Generate()
        return self.call

    async def close(self) -> None:
        if self.call is not None:
            await self.call.done_writing()
            assert await read_rest(self.call) == []
            assert await self.call.code() == grpc.StatusCode.OK
        if self.channel is not None:
            await self.channel.close()

    async def run_case(self, messages: Sequence[pb.GenerateRequest]) -> None:
        number = self.tally.cases
        self.tally.cases += 1
        self.tally.messages += len(messages)
        prefix = f"c{number}-"
        sent = [_with_prefix(m, prefix) for m in messages]
        oversize = next((i for i, m in enumerate(sent) if m.ByteSize() > FUZZ_MESSAGE_BYTES), None)
        try:
            if oversize is not None:
                await self._run_oversize(sent[: oversize + 1])
            else:
                await self._run(sent, prefix)
        except BaseException:
            # Start the next case (hypothesis shrinking) on a clean stream, not amid this one's leftovers.
            if self.call is not None:
                self.call.cancel()
                self.call = None
            raise
        finally:
            await _wait_idle(self.server)

    async def _run_oversize(self, sent: Sequence[pb.GenerateRequest]) -> None:
        """A message over the limit ends the whole RPC with RESOURCE_EXHAUSTED (and frees its requests)."""
        call = await self._open()
        try:
            for message in sent:
                await call.write(message)
            await read_rest(call)
        except grpc.aio.AioRpcError:
            pass
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, await call.details()
        self.tally.outcomes["RPC RESOURCE_EXHAUSTED"] += 1
        self.tally.reopened += 1
        self.call = None

    async def _run(self, sent: Sequence[pb.GenerateRequest], prefix: str) -> None:
        call = await self._open()
        runner = self.server.engine.runner
        assert isinstance(runner, FakeRunner)
        for message in sent:
            await call.write(message)
        # Requests are read in order: once the marker's NOT_FOUND is back, every refusal before it is too.
        marker = f"{prefix}marker"
        await call.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id=marker)))
        responses = await read_until_done(call, [marker])
        assert [(r.error.code, r.error.field) for r in responses if r.request_id == marker] == [
            (NOT_FOUND, "interrupt.request_id")
        ]
        starts_ = [m.start for m in sent if m.HasField("start")]
        named = Counter(s.request_id for s in starts_ if s.request_id)
        anonymous = sum(1 for s in starts_ if not s.request_id)
        refused_anonymous = sum(1 for r in responses if r.request_id == "" and _ends_a_start(r))
        known = {*named, *(m.interrupt.request_id for m in sent if m.HasField("interrupt")), "", marker}
        # Then read on until every accepted Start has ended, named or server-named.
        while True:
            done = Counter(r.request_id for r in responses if _ends_a_start(r))
            assigned = {r.request_id for r in responses if r.request_id not in known}
            assigned_done = {i for i in assigned if done[i]}
            if all(done[i] >= n for i, n in named.items()) and (
                len(assigned_done) >= anonymous - refused_anonymous
            ):
                break
            responses.append(await _read(call))
        self._judge(sent, responses, runner, known, anonymous - refused_anonymous)

    def _judge(
        self,
        sent: Sequence[pb.GenerateRequest],
        responses: list[pb.GenerateResponse],
        runner: FakeRunner,
        known: set[str],
        accepted_anonymous: int,
    ) -> None:
        grouped = by_request(responses)
        interrupts = Counter(m.interrupt.request_id for m in sent if m.HasField("interrupt"))
        bad_mode = Counter(
            m.interrupt.request_id
            for m in sent
            if m.HasField("interrupt") and m.interrupt.mode not in range(3)
        )
        starts_ = [m.start for m in sent if m.HasField("start")]
        for request_id, group in grouped.items():
            interrupt_errors = [r for r in group if _is_interrupt_error(r)]
            printable = printable_id(request_id)
            for r in interrupt_errors:
                check_error(r.error)
                # An unprintable id is refused first, whatever the mode; then a bad mode; then unknown ids
                if not printable:
                    assert (r.error.code, r.error.field) == (INVALID, "interrupt.request_id"), r
                else:
                    expected = INVALID if r.error.field == "interrupt.mode" else NOT_FOUND
                    assert r.error.code == expected, r
                self.tally.outcomes[f"interrupt {r.error.field}"] += 1
            assert len(interrupt_errors) <= interrupts[request_id] + (
                1 if request_id.endswith("marker") else 0
            )
            if printable:
                modes = sum(r.error.field == "interrupt.mode" for r in interrupt_errors)
                assert modes == bad_mode[request_id]
            rest = [r for r in group if not _is_interrupt_error(r)]
            if request_id.endswith("-marker"):
                continue
            if request_id == "":
                # Heartbeats are answered with nothing (by_request drops the server's own).
                kinds = [r for r in rest if r.error.field == "kind"]
                assert len(kinds) == sum(1 for m in sent if m.WhichOneof("kind") is None)
                for r in kinds:
                    assert r.error.code == INVALID
                    self.tally.outcomes["error kind"] += 1
                rest = [r for r in rest if r.error.field != "kind"]
            if request_id not in known:  # server-assigned
                runs = split_runs(rest)
                assert len(runs) == 1, f"a server-assigned id ran twice: {request_id}"
                candidates = [s for s in starts_ if not s.request_id]
                self._check_runs(runs, candidates, sent, runner)
                continue
            candidates = [s for s in starts_ if s.request_id == request_id]
            runs = split_runs(rest)
            if request_id:
                assert len(runs) == len(candidates), (request_id, len(runs), len(candidates))
            self._check_runs(runs, candidates, sent, runner)
            if not candidates:
                assert interrupts[request_id] == len(interrupt_errors), request_id
        assigned = [i for i in grouped if i not in known]
        assert len(assigned) == accepted_anonymous, (assigned, accepted_anonymous)

    def _check_runs(
        self,
        runs: list[list[pb.GenerateResponse]],
        candidates: list[pb.Start],
        sent: Sequence[pb.GenerateRequest],
        runner: FakeRunner,
    ) -> None:
        dup = len(candidates) > 1
        for run in runs:
            failures = []
            for message in candidates:  # with duplicates, a run must fit one of its id's Starts
                verdict = judge(message, runner, interrupted=_interrupted(sent, message.request_id))
                try:
                    check_run(run, message, verdict, dup)
                    break
                except AssertionError as failure:
                    failures.append(failure)
            else:
                raise AssertionError("fits none of its id's Starts:\n" + "\n".join(map(str, failures)))
            first = run[0] if kind(run[0]) == "error" else run[-1]
            label = (
                f"error {first.error.code} {first.error.field}"
                if kind(first) == "error"
                else f"finished {pb.StopReason.Name(first.finished.reason)}"
            )
            self.tally.outcomes[label] += 1


def _is_interrupt_error(response: pb.GenerateResponse) -> bool:
    return kind(response) == "error" and response.error.field.startswith("interrupt.")


def _ends_a_start(response: pb.GenerateResponse) -> bool:
    if kind(response) == "finished":
        return True
    return kind(response) == "error" and not (
        response.error.field == "kind" or response.error.field.startswith("interrupt.")
    )


def _interrupted(sent: Sequence[pb.GenerateRequest], request_id: str) -> bool:
    return bool(request_id) and any(
        m.HasField("interrupt") and m.interrupt.request_id == request_id and m.interrupt.mode in range(3)
        for m in sent
    )


async def _read(call: grpc.aio.StreamStreamCall, timeout: float = 10.0) -> pb.GenerateResponse:
    response = await asyncio.wait_for(call.read(), timeout)
    assert response is not grpc.aio.EOF, "the stream ended while requests were still live"
    return response


def _short(message: pb.GenerateRequest) -> str:
    part = message.start if message.HasField("start") else message.interrupt
    text = "" if message.HasField("heartbeat") else str(part).replace("\n", " ")
    return text if len(text) < 600 else text[:600] + "..."


def _with_prefix(message: pb.GenerateRequest, prefix: str) -> pb.GenerateRequest:
    """The case's logical ids made unique to the case; empty ids stay empty."""
    copy = pb.GenerateRequest()
    copy.CopyFrom(message)
    part = copy.start if copy.HasField("start") else copy.interrupt if copy.HasField("interrupt") else None
    if part is not None and part.request_id:
        part.request_id = prefix + part.request_id
    return copy


async def _wait_idle(server: BackgroundServer, timeout: float = 2.0) -> None:
    # Finished is delivered after the request released its row: idle now, or within a step.
    deadline = time.monotonic() + timeout
    while not server.engine.is_idle():
        assert time.monotonic() < deadline, f"engine busy after the case: {server.engine.num_live()} live"
        await asyncio.sleep(0.002)


async def _normal_request_works(server: BackgroundServer) -> None:
    async with grpc.aio.insecure_channel(server.server.address) as channel:
        call = pb_grpc.TokenWireStub(channel).Generate()
        await call.write(start("after-fuzz", 5))
        await call.done_writing()
        responses = await read_rest(call)
        assert check_generation(responses).reason == pb.STOP_REASON_MAX_TOKENS
        assert await call.code() == grpc.StatusCode.OK
    await _wait_idle(server)


# Cases share a server, so a slow one is not a bug in the code under test; big inputs are on purpose.
FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def _fuzz_generate(server: BackgroundServer, examples: int, *, huge: bool) -> Tally:
    stream = FuzzStream(server)

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(cases(huge))
    def case(messages: list[pb.GenerateRequest]) -> None:
        try:
            server.run(stream.run_case(messages), timeout=30)
        except AssertionError as failure:  # hypothesis cannot print protobuf messages well
            shown = "\n".join(f"  {m.WhichOneof('kind')}: {_short(m)}" for m in messages)
            raise AssertionError(f"{failure}\ncase:\n{shown}") from None

    began = time.monotonic()
    try:
        case()
    finally:
        server.run(stream.close())
    server.run(_normal_request_works(server))
    print(
        f"\nfuzzed {stream.tally.cases} Generate cases ({stream.tally.messages} messages) in "
        f"{time.monotonic() - began:.1f} s; stream reopened {stream.tally.reopened}x; "
        f"outcomes: {dict(stream.tally.outcomes.most_common())}"
    )
    return stream.tally


def test_fuzz_generate_fast(fuzz_server: BackgroundServer) -> None:
    tally = _fuzz_generate(fuzz_server, examples=200, huge=False)
    assert tally.cases >= 200


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~4-6 min alone on two cores; more when they are shared
def test_fuzz_generate_10k(fuzz_server: BackgroundServer) -> None:
    tally = _fuzz_generate(fuzz_server, examples=10_000, huge=True)
    assert tally.cases >= 10_000


# ---- message size boundaries ----


def _sized(build: Callable[[int], Message], size: int) -> Message:
    """build(n) grown until its serialized size is exactly `size` (a varint length may skip one)."""
    n = size
    while build(n).ByteSize() > size:
        n -= 1
    return build(n)


async def _generate_one(
    address: str, message: pb.GenerateRequest
) -> tuple[list[pb.GenerateResponse], grpc.StatusCode]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.TokenWireStub(channel).Generate()
        responses: list[pb.GenerateResponse] = []
        try:
            await call.write(message)
            await call.done_writing()
            responses = await read_rest(call)
        except grpc.aio.AioRpcError:
            pass
        return responses, await call.code()


async def _tokenize(address: str, request: pb.TokenizeRequest) -> pb.TokenizeResponse | grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            return await pb_grpc.TokenWireStub(channel).Tokenize(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error


def test_messages_at_and_over_the_size_limit(fuzz_server: BackgroundServer) -> None:
    limit, address = FUZZ_MESSAGE_BYTES, fuzz_server.server.address

    def prompt(n: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(start=pb.Start(request_id="big", prompt="x" * n))

    def token_ids(n: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(start=pb.Start(request_id="big", token_ids=pb.TokenIds(ids=[3] * n)))

    at_limit = _sized(prompt, limit)
    assert at_limit.ByteSize() == limit
    responses, code = fuzz_server.run(_generate_one(address, at_limit))
    assert code == grpc.StatusCode.OK
    check_generation(responses)  # "xxx..." is one (unknown) token: it runs
    responses, code = fuzz_server.run(_generate_one(address, _sized(token_ids, limit)))
    assert code == grpc.StatusCode.OK and [(r.error.code, r.error.field) for r in responses] == [
        (INVALID, "start.input")  # 262,000 prompt tokens: more than the context holds
    ]
    for over in (_sized(prompt, limit + 1), _sized(token_ids, limit + 1), prompt(4 * limit)):
        assert over.ByteSize() > limit
        assert fuzz_server.run(_generate_one(address, over))[1] == grpc.StatusCode.RESOURCE_EXHAUSTED

    def text(n: int) -> pb.TokenizeRequest:
        return pb.TokenizeRequest(text="x" * n)

    answer = fuzz_server.run(_tokenize(address, _sized(text, limit)))
    assert isinstance(answer, pb.TokenizeResponse) and list(answer.token_ids) == [0]
    answer = fuzz_server.run(_tokenize(address, _sized(text, limit + 1)))
    assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fuzz_server.run(_wait_idle(fuzz_server))
    fuzz_server.run(_normal_request_works(fuzz_server))


# ---- Tokenize ----

TOKENIZE = st.one_of(
    st.builds(pb.TokenizeRequest, text=TEXT),
    st.builds(lambda messages: pb.TokenizeRequest(chat=pb.Chat(messages=messages)), ANY_CHAT),
    st.just(pb.TokenizeRequest()),
)


def _check_tokenize(
    request: pb.TokenizeRequest, answer: pb.TokenizeResponse | grpc.aio.AioRpcError, runner: FakeRunner
) -> str:
    which = request.WhichOneof("input")
    expected_field = None
    if which is None:
        expected_field = "input"
    elif which == "chat":
        messages = request.chat.messages
        if not messages or any(not m.role for m in messages):
            expected_field = "chat.messages"
        elif any(m.role not in ("system", "user", "assistant") for m in messages):
            expected_field = "chat"
    if isinstance(answer, grpc.aio.AioRpcError):
        if answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Either way over the limit: the request, or the answer (ids plus one string per token).
            return "RESOURCE_EXHAUSTED"
        assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT, (answer.code(), answer.details())
        assert expected_field is not None, f"refused a valid request: {answer.details()}"
        assert (answer.details() or "").startswith(expected_field), (answer.details(), expected_field)
        return f"INVALID_ARGUMENT {expected_field}"
    assert expected_field is None, f"accepted, but {expected_field} is invalid"
    if which == "text":
        assert list(answer.token_ids) == runner.encode(request.text)
    else:
        assert list(answer.token_ids) == runner.encode_chat(
            [(m.role, m.content) for m in request.chat.messages]
        )
    assert list(answer.tokens) == runner.token_texts(list(answer.token_ids))
    return f"OK {which}"


def _fuzz_tokenize(server: BackgroundServer, examples: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    runner = server.engine.runner
    assert isinstance(runner, FakeRunner)

    async def one(
        request: pb.TokenizeRequest, channel: grpc.aio.Channel
    ) -> pb.TokenizeResponse | grpc.aio.AioRpcError:
        try:
            return await pb_grpc.TokenWireStub(channel).Tokenize(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error

    channel = server.run(_make_channel(server.server.address))

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(TOKENIZE)
    def case(request: pb.TokenizeRequest) -> None:
        outcomes[_check_tokenize(request, server.run(one(request, channel)), runner)] += 1

    try:
        case()
    finally:
        server.run(channel.close())
    return outcomes


async def _make_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def test_fuzz_tokenize_fast(fuzz_server: BackgroundServer) -> None:
    outcomes = _fuzz_tokenize(fuzz_server, 100)
    print(f"\nfuzzed {sum(outcomes.values())} Tokenize cases: {dict(outcomes)}")


# ---- raw bytes on the wire ----


def _mutations() -> st.SearchStrategy[bytes]:
    """Valid GenerateRequest encodings with bytes flipped, cut or appended, plus plain noise."""

    def mutate(message: pb.GenerateRequest, flips: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
        data = bytearray(message.SerializeToString())
        for at, value in flips:
            if data:
                data[at % len(data)] = value
        return bytes(data[: max(0, len(data) - cut)]) + tail

    return st.one_of(
        st.binary(max_size=64),
        st.builds(
            mutate,
            cases().map(lambda messages: messages[0]),
            st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
            st.integers(0, 3),
            st.binary(max_size=8),
        ),
    )


async def _send_raw(address: str, data: bytes) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        # The method path with identity serialization: the server parses whatever bytes arrive.
        generate = channel.stream_stream(
            "/tokenwire.v1.TokenWire/Generate",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        call = generate()
        try:
            await call.write(data)
            await call.done_writing()
            for response in await read_rest(call):
                if kind(response) == "error":
                    check_error(response.error)
        except grpc.aio.AioRpcError:
            pass
        return await call.code()


def _fuzz_raw(server: BackgroundServer, examples: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(_mutations())
    def case(data: bytes) -> None:
        code = server.run(_send_raw(server.server.address, data))
        # OK: the bytes parsed (unknown fields are skipped, and whatever they asked for was answered);
        # INVALID_ARGUMENT: they did not parse, so the RPC ends with an error rather than a silent OK.
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
        outcomes[code.name] += 1
        server.run(_wait_idle(server))

    case()
    return outcomes


def test_fuzz_raw_bytes_fast(fuzz_server: BackgroundServer) -> None:
    outcomes = _fuzz_raw(fuzz_server, 60)
    print(f"\nsent {sum(outcomes.values())} raw byte strings as GenerateRequests: {dict(outcomes)}")
    fuzz_server.run(_normal_request_works(fuzz_server))


# ---- Cancel ----


CANCEL_IDS = st.one_of(
    st.just(""),
    ANY_TEXT,
    BAD_ID,
    st.just("live"),
    st.integers(FUZZ_MESSAGE_BYTES - 8, FUZZ_MESSAGE_BYTES + 8).map(lambda n: "z" * n),
)
# How the id a case sends relates to the live request's: itself, or near misses that must not match.
LIVE_VARIANTS = st.sampled_from(["same", "same", "prefix", "suffix", "upper", "other"])


class CancelCases:
    """Cancel by fuzzed ids, each case with or without a live generation on a side stream."""

    def __init__(self, server: BackgroundServer) -> None:
        self.server = server
        self.outcomes: Counter[str] = Counter()
        self.count = 0
        self.channel: grpc.aio.Channel | None = None
        self.call: grpc.aio.StreamStreamCall | None = None

    async def run(self, request_id: str, live: bool, variant: str) -> None:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.server.server.address)
            self.call = pb_grpc.TokenWireStub(self.channel).Generate()
        assert self.call is not None
        self.count += 1
        live_id = f"live-{self.count}"
        seen: list[pb.GenerateResponse] = []
        if live:
            await self.call.write(start(live_id, None))
            seen.append(await _read(self.call))
            assert kind(seen[0]) == "started", seen
            request_id = {
                "same": live_id,
                "prefix": live_id[:-1],
                "suffix": live_id + request_id[:3],
                "upper": live_id.upper(),
                "other": request_id,
            }[variant]
        request = pb.CancelRequest(request_id=request_id)
        try:
            answer: pb.CancelResponse | grpc.aio.AioRpcError = await pb_grpc.TokenWireStub(
                self.channel
            ).Cancel(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            answer = error
        hits = live and request_id == live_id
        if isinstance(answer, grpc.aio.AioRpcError):
            if request.ByteSize() > FUZZ_MESSAGE_BYTES:
                assert answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
            else:
                refused = not request_id or not printable_id(request_id)
                assert refused and answer.code() == grpc.StatusCode.INVALID_ARGUMENT, answer
                assert (answer.details() or "").startswith("request_id")
            self.outcomes[answer.code().name] += 1
        else:
            assert answer.found == hits, (request_id, live_id, answer)
            assert answer.HasField("summary") == hits
            self.outcomes[f"found={answer.found}"] += 1
        if live:
            if not hits:
                await self.call.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id=live_id)))
            seen += await read_until_done(self.call, [live_id])
            finished = check_generation(seen)
            if hits:
                assert isinstance(answer, pb.CancelResponse)
                assert finished.reason == pb.STOP_REASON_CANCELLED and finished == answer.summary
            else:
                assert finished.reason == pb.STOP_REASON_INTERRUPTED
        await _wait_idle(self.server)

    async def close(self) -> None:
        if self.call is not None:
            await self.call.done_writing()
            assert await read_rest(self.call) == []
        if self.channel is not None:
            await self.channel.close()


def _fuzz_cancel(server: BackgroundServer, examples: int) -> Counter[str]:
    cases_ = CancelCases(server)

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(CANCEL_IDS, st.booleans(), LIVE_VARIANTS)
    def case(request_id: str, live: bool, variant: str) -> None:
        server.run(cases_.run(request_id, live, variant))

    try:
        case()
    finally:
        server.run(cases_.close())
    return cases_.outcomes


def test_fuzz_cancel_fast(cancel_server: BackgroundServer) -> None:
    outcomes = _fuzz_cancel(cancel_server, 60)
    print(f"\nfuzzed {sum(outcomes.values())} Cancel cases: {dict(outcomes)}")


# ---- the slow group: the same, many more times ----


@pytest.mark.slow
def test_fuzz_unary_and_raw_slow(fuzz_server: BackgroundServer, cancel_server: BackgroundServer) -> None:
    began = time.monotonic()
    cancels = _fuzz_cancel(cancel_server, 1000)
    tokenizes = _fuzz_tokenize(fuzz_server, 2000)
    raws = _fuzz_raw(fuzz_server, 2000)
    fuzz_server.run(_normal_request_works(fuzz_server))
    print(
        f"\nfuzzed {sum(cancels.values())} Cancel ({dict(cancels)}), {sum(tokenizes.values())} Tokenize "
        f"({dict(tokenizes)}) and {sum(raws.values())} raw-bytes cases ({dict(raws)}) in "
        f"{time.monotonic() - began:.1f} s"
    )
