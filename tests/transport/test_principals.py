"""Safe to share, from the attacker's side: a second principal on its own connection can neither see,
touch nor probe the first's requests and sessions, cannot take every slot or stream, and is named by
its token (from a reloadable tokens file) or its client certificate."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import FAKE_ENGINE, free_port, running_server, wait_until_idle
from tests.reliability.contract import read_first_chunk, read_rest, read_until_done
from tests.transport.test_service import check_lifecycle, of, start
from tokenwire.service.transport.auth import RELOAD_CHECK_S, TokensFileError, TokenTable, parse_tokens
from tokenwire.service.transport.server import RunningServer
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

TOKENS = (
    "# callers of the test server\nalice alice-token-0001\nmallory mallory-token-02\nops ops-token-000003\n"
)
LONG = 100_000  # tokens: with step_delay 2 ms a request runs for minutes unless stopped


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


ALICE, MALLORY, OPS = bearer("alice-token-0001"), bearer("mallory-token-02"), bearer("ops-token-000003")


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    return path


@pytest.fixture
async def shared(tokens_file: Path) -> AsyncIterator[RunningServer]:
    """A server two callers share, each on its own connection (see `channels`)."""
    config = dataclasses.replace(FAKE_ENGINE, max_live_requests=32, max_live_requests_per_owner=4)
    async with running_server(
        config,
        context_length=LONG + 64,
        auth_tokens_file=str(tokens_file),
        operators=("ops",),
        max_streams_per_principal=3,
    ) as server:
        yield server


@pytest.fixture
async def channels(
    shared: RunningServer,
) -> AsyncIterator[tuple[pb_grpc.TokenWireStub, pb_grpc.TokenWireStub]]:
    """(the victim's stub, the attacker's stub), on two connections."""
    async with (
        grpc.aio.insecure_channel(shared.address) as victim,
        grpc.aio.insecure_channel(shared.address) as attacker,
    ):
        yield pb_grpc.TokenWireStub(victim), pb_grpc.TokenWireStub(attacker)


async def test_another_principal_cannot_cancel_or_probe_a_request(
    shared: RunningServer, channels: tuple[pb_grpc.TokenWireStub, pb_grpc.TokenWireStub]
) -> None:
    victim, attacker = channels
    call = victim.Generate(metadata=ALICE)
    seen: list[pb.GenerateResponse] = []
    await call.write(start("hello-1", LONG))
    await read_first_chunk(call, "hello-1", seen)

    cancelled = await attacker.Cancel(pb.CancelRequest(request_id="hello-1"), metadata=MALLORY)
    assert not cancelled.found and not cancelled.HasField("summary")  # not found: nothing leaks

    # The same id is free in the attacker's namespace: no ALREADY_EXISTS telling it the id is taken.
    squat = attacker.Generate(metadata=MALLORY)
    await squat.write(start("hello-1", 3))
    await squat.done_writing()
    check_lifecycle(await read_rest(squat))

    # The victim's request ran on through all of it, and its owner can stop it.
    assert shared.engine is not None and shared.engine.stream_of("hello-1", "alice") is not None
    mine = await victim.Cancel(pb.CancelRequest(request_id="hello-1"), metadata=ALICE)
    assert mine.found and mine.summary.reason == pb.STOP_REASON_CANCELLED
    await call.done_writing()
    assert check_lifecycle(seen + await read_rest(call)).reason == pb.STOP_REASON_CANCELLED


async def test_an_operator_cancels_any_principals_request(
    shared: RunningServer, channels: tuple[pb_grpc.TokenWireStub, pb_grpc.TokenWireStub]
) -> None:
    victim, operator = channels
    call = victim.Generate(metadata=ALICE)
    seen: list[pb.GenerateResponse] = []
    await call.write(start("runaway", LONG))
    await read_first_chunk(call, "runaway", seen)
    cancelled = await operator.Cancel(pb.CancelRequest(request_id="runaway"), metadata=OPS)
    assert cancelled.found and cancelled.summary.reason == pb.STOP_REASON_CANCELLED
    await call.done_writing()
    assert check_lifecycle(seen + await read_rest(call)).reason == pb.STOP_REASON_CANCELLED
    await wait_until_idle(shared.engine)  # type: ignore[arg-type]


async def test_sessions_are_their_owners_alone(
    shared: RunningServer, channels: tuple[pb_grpc.TokenWireStub, pb_grpc.TokenWireStub]
) -> None:
    victim, attacker = channels

    async def turn(
        stub: pb_grpc.TokenWireStub, who: Any, request_id: str, **fields: Any
    ) -> tuple[pb.Started, pb.Finished]:
        call = stub.Generate(metadata=who)
        await call.write(start(request_id, 6, session_id="s-1", **fields))
        await call.done_writing()
        responses = await read_rest(call)
        check_lifecycle(responses)
        return responses[0].started, responses[-1].finished

    started, first = await turn(victim, ALICE, "a1", prompt=" my pin is 4711")
    history = started.prompt_tokens + first.usage.completion_tokens

    # The attacker names the victim's session: it gets an empty one of its own (no history, nothing
    # cached, nothing that tells how long the victim's is), and truncating it touches only its own.
    started, _ = await turn(attacker, MALLORY, "m1", prompt=" what was my pin?")
    assert started.cached_prompt_tokens == 0
    assert started.prompt_tokens < history
    truncate = pb.SessionTruncation(reply_chars=0)
    await turn(attacker, MALLORY, "m2", prompt=" again", truncate_session=truncate)

    # The victim's next turn sees its own history, whole, and its cache.
    started, _ = await turn(victim, ALICE, "a2", prompt=" thanks")
    assert started.prompt_tokens > history and started.cached_prompt_tokens > 0

    # Busy is per owner too: the victim's live turn does not refuse the attacker's.
    long_turn = victim.Generate(metadata=ALICE)
    seen: list[pb.GenerateResponse] = []
    await long_turn.write(start("a3", LONG, session_id="s-1"))
    await read_first_chunk(long_turn, "a3", seen)
    started, _ = await turn(attacker, MALLORY, "m3", prompt=" busy?")
    assert started.prompt_tokens > 0
    await long_turn.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id="a3")))
    await long_turn.done_writing()
    await read_rest(long_turn)
    await wait_until_idle(shared.engine)  # type: ignore[arg-type]


async def test_one_principal_cannot_take_every_slot_or_stream(
    shared: RunningServer, channels: tuple[pb_grpc.TokenWireStub, pb_grpc.TokenWireStub]
) -> None:
    victim, attacker = channels
    # Live requests: 4 each (max_live_requests_per_owner), on one stream.
    greedy = attacker.Generate(metadata=MALLORY)
    for i in range(6):
        await greedy.write(start(f"g{i}", LONG))
    refusals: list[pb.GenerateResponse] = []
    while len(refusals) < 2:
        response = await asyncio.wait_for(greedy.read(), 5)
        if response.WhichOneof("kind") == "error":
            refusals.append(response)
    assert {r.request_id for r in refusals} == {"g4", "g5"}
    assert all(r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for r in refusals)
    assert all(r.error.refused == pb.Error.REFUSAL_START for r in refusals)
    assert "the most one caller may have" in refusals[0].error.message

    # Streams: 3 each; the fourth is refused, and the victim still opens its own.
    extra = [attacker.Generate(metadata=MALLORY) for _ in range(3)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(extra[-1].read(), 5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "open Generate stream" in (caught.value.details() or "")

    call = victim.Generate(metadata=ALICE)
    await call.write(start("mine", 3))
    await call.done_writing()
    check_lifecycle(await read_rest(call))

    for other in extra[:2]:
        other.cancel()
    greedy.cancel()
    await wait_until_idle(shared.engine, timeout=5)  # type: ignore[arg-type]
    # The streams were counted down as they ended: the attacker may open its 3 again.
    again = [attacker.Generate(metadata=MALLORY) for _ in range(3)]
    for i, stream in enumerate(again):
        await stream.write(start(f"again-{i}", 2))
        await stream.done_writing()
    for stream in again:
        check_lifecycle(await read_rest(stream))


async def test_a_refused_start_cannot_be_mistaken_for_the_end_of_a_live_request(
    shared: RunningServer, channels: tuple[pb_grpc.TokenWireStub, pb_grpc.TokenWireStub]
) -> None:
    stub, _ = channels
    call = stub.Generate(metadata=ALICE)
    seen: list[pb.GenerateResponse] = []
    await call.write(start("dup", LONG))  # message 0
    await read_first_chunk(call, "dup", seen)
    await call.write(start("dup", 3))  # 1: the same id again
    await call.write(start("", 3, prompt=""))  # 2: no id, and refused
    await call.write(pb.GenerateRequest())  # 3: neither kind
    await call.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id="nobody")))  # 4
    errors: list[pb.GenerateResponse] = []
    while len(errors) < 4:
        response = await asyncio.wait_for(call.read(), 5)
        if response.WhichOneof("kind") == "error":
            errors.append(response)
        else:
            seen.append(response)
    shapes = [(e.request_id, e.error.refused, e.error.message_index, e.error.code) for e in errors]
    assert shapes == [
        ("dup", pb.Error.REFUSAL_START, 1, grpc.StatusCode.ALREADY_EXISTS.value[0]),
        ("", pb.Error.REFUSAL_START, 2, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        ("", pb.Error.REFUSAL_MESSAGE, 3, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        ("nobody", pb.Error.REFUSAL_INTERRUPT, 4, grpc.StatusCode.NOT_FOUND.value[0]),
    ]
    # The live "dup" went on: it still ends with its own Finished, when interrupted.
    await call.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id="dup")))
    await call.done_writing()
    rest = seen + await read_rest(call)
    assert check_lifecycle(of(rest, "dup")).reason == pb.STOP_REASON_INTERRUPTED


async def test_the_tokens_file_is_reloaded_without_a_restart(
    shared: RunningServer, tokens_file: Path
) -> None:
    async with grpc.aio.insecure_channel(shared.address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        carol = bearer("carol-token-00004")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=carol)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Mallory's token is revoked and Carol's added, by replacing the file (as a secret rotates).
        replacement = tokens_file.with_suffix(".new")
        replacement.write_text("alice alice-token-0001\ncarol carol-token-00004\n")
        os.replace(replacement, tokens_file)

        async def accepted(metadata: Any) -> bool:
            try:
                await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        deadline = time.monotonic() + RELOAD_CHECK_S + 3
        while not await accepted(carol):
            assert time.monotonic() < deadline, "the new token was not taken"
            await asyncio.sleep(0.1)
        assert not await accepted(MALLORY)
        assert await accepted(ALICE)

        # A broken file keeps the tokens in force.
        tokens_file.write_text("alice\n")
        await asyncio.sleep(RELOAD_CHECK_S + 0.2)
        assert await accepted(ALICE) and await accepted(carol)


def test_tokens_files_that_cannot_be_used_say_which_line(tmp_path: Path) -> None:
    assert parse_tokens("a tok-a\n\n# c\nb tok-b\n", "f") == {"a": b"tok-a", "b": b"tok-b"}
    for text, expected in [
        ("a tok-a\na tok-b\n", "f line 2: the name 'a' is given twice"),
        ("a tok-a\nb tok-a\n", "f line 2: the token of 'b' is also another name's"),
        ("a\n", "f line 1: expected '<name> <token>', found 1 fields"),
        ("anonymous tok\n", "f line 1: 'anonymous' names the caller of a server without auth"),
        ("# nobody\n", "f: no '<name> <token>' line"),
    ]:
        with pytest.raises(TokensFileError, match=expected):
            parse_tokens(text, "f")
    with pytest.raises(TokensFileError, match="cannot read"):
        TokenTable(path=str(tmp_path / "missing"))
    clash = tmp_path / "clash"
    clash.write_text("default tok\n")
    with pytest.raises(TokensFileError, match="--auth-token's name"):
        TokenTable("other", str(clash))


async def test_client_certificates_name_principals_and_health_has_a_plaintext_port(certs: Path) -> None:
    ca = (certs / "ca.pem").read_bytes()
    tls: dict[str, Any] = {
        "tls_cert": str(certs / "server.pem"),
        "tls_key": str(certs / "server.key"),
        "tls_client_ca": str(certs / "ca.pem"),
    }
    health_port = free_port()
    async with running_server(context_length=LONG + 64, health_port=health_port, **tls) as server:
        assert server.health_port == health_port

        def credentials(name: str) -> grpc.ChannelCredentials:
            key, cert = (certs / f"{name}.key").read_bytes(), (certs / f"{name}.pem").read_bytes()
            return grpc.ssl_channel_credentials(ca, key, cert)

        async with (
            grpc.aio.secure_channel(server.address, credentials("client")) as victim,
            grpc.aio.secure_channel(server.address, credentials("client2")) as attacker,
        ):
            call = pb_grpc.TokenWireStub(victim).Generate()
            seen: list[pb.GenerateResponse] = []
            await call.write(start("x", LONG))
            await read_first_chunk(call, "x", seen)
            assert server.engine is not None and server.engine.stream_of("x", "client") is not None
            other = pb_grpc.TokenWireStub(attacker)
            assert not (await other.Cancel(pb.CancelRequest(request_id="x"))).found
            assert (await pb_grpc.TokenWireStub(victim).Cancel(pb.CancelRequest(request_id="x"))).found
            await call.done_writing()
            await read_until_done(call, ["x"])

        # A probe without a certificate: health answers on the plaintext port, and nothing else does.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as plain:
            answer = await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.TokenWireStub(plain).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_continue_session_refuses_a_session_the_caller_does_not_hold(
    channels: tuple[pb_grpc.TokenWireStub, pb_grpc.TokenWireStub],
) -> None:
    victim, attacker = channels

    async def turn(
        stub: pb_grpc.TokenWireStub, who: Any, request_id: str, **fields: Any
    ) -> pb.GenerateResponse:
        call = stub.Generate(metadata=who)
        await call.write(start(request_id, 4, **fields))
        await call.done_writing()
        return (await read_rest(call))[-1]

    assert (await turn(victim, ALICE, "c0", session_id="held")).HasField("finished")
    assert (await turn(victim, ALICE, "c1", session_id="held", continue_session=True)).HasField("finished")
    # Another principal continuing it finds nothing in its own namespace: NOT_FOUND, not the history.
    refused = await turn(attacker, MALLORY, "m1", session_id="held", continue_session=True)
    assert refused.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert refused.error.field == "start.session_id" and refused.error.refused == pb.Error.REFUSAL_START
    assert "send the whole conversation" in refused.error.message
    alone = await turn(victim, ALICE, "c2", continue_session=True)
    assert (alone.error.code, alone.error.field) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "start.continue_session",
    )
