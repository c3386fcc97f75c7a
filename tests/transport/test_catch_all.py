"""The catch-all interceptor: a bug in any handler answers INTERNAL with a short message and logs once;
deliberate aborts and chosen status codes pass through as they were."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import running_server, wait_until_idle
from tests.reliability.contract import read_rest
from tokenwire.service.engine.engine import Engine
from tokenwire.service.engine.wording import MAX_SHOWN_ID_CHARS, shown_id
from tokenwire.service.transport import servicer
from tokenwire.service.transport.interceptors import CatchAllInterceptor
from tokenwire.service.transport.server import RunningServer
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

SECRET = "secret-path /srv/weights.bin"  # what a bug's message might reveal; clients must not see it
LOGGER = "tokenwire.internal"


def boom(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError(SECRET)


async def async_boom(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError(SECRET)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with running_server() as running:
        yield running


def engine_of(server: RunningServer) -> Engine:
    assert server.engine is not None
    return server.engine


def check_internal(error: grpc.aio.AioRpcError, message: str) -> None:
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INTERNAL, (error.code(), details)
    assert details == message
    assert "Traceback" not in details and "RuntimeError" not in details and SECRET not in details


def check_logged(caplog: pytest.LogCaptureFixture, method: str, request_id: str) -> None:
    """Exactly one ERROR line, with the traceback, the method and the request id (escaped and capped
    in the line, capped in the record's field)."""
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    shown = shown_id(request_id) if request_id else "-"
    assert record.getMessage() == f"internal error in {method} request_id={shown}"
    assert (record.method, record.request_id) == (method, request_id[:MAX_SHOWN_ID_CHARS])  # type: ignore[attr-defined]
    assert SECRET in caplog.text and "Traceback" in caplog.text  # the log has what the client does not


@pytest.mark.parametrize(
    ("rpc", "patch", "request_id"),
    [
        ("Cancel", "cancel", "c-1"),
        ("GetModelInfo", "model_info", ""),
        ("Tokenize", "tokenize_text", ""),
    ],
)
async def test_a_bug_in_a_unary_handler_answers_internal(
    server: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    rpc: str,
    patch: str,
    request_id: str,
) -> None:
    engine = engine_of(server)
    monkeypatch.setattr(engine, patch, async_boom if patch != "model_info" else boom)
    requests: dict[str, Any] = {
        "Cancel": pb.CancelRequest(request_id=request_id),
        "GetModelInfo": pb.GetModelInfoRequest(),
        "Tokenize": pb.TokenizeRequest(text=" hello"),
    }
    caplog.set_level(logging.ERROR, LOGGER)
    async with grpc.aio.insecure_channel(server.address) as channel:
        call: Callable[..., Any] = getattr(pb_grpc.TokenWireStub(channel), rpc)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(requests[rpc], timeout=5)
    expected = (
        f"internal error (request {request_id}); see the server log"
        if request_id
        else "internal error; see the server log"
    )
    check_internal(caught.value, expected)
    check_logged(caplog, f"/tokenwire.v1.TokenWire/{rpc}", request_id)


async def test_an_overlong_request_id_is_not_repeated(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancel's request_id is the client's, unchecked: one past the contract's 128 characters is left out."""
    monkeypatch.setattr(engine_of(server), "cancel", async_boom)
    caplog.set_level(logging.ERROR, LOGGER)
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.TokenWireStub(channel).Cancel(pb.CancelRequest(request_id="x" * 5000), timeout=5)
    check_internal(caught.value, "internal error; see the server log")
    check_logged(caplog, "/tokenwire.v1.TokenWire/Cancel", "x" * 5000)
    assert "x" * 129 not in caplog.text and "(cut: 5,000 characters)" in caplog.text


async def test_a_request_id_cannot_forge_a_log_line(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engine_of(server), "cancel", async_boom)
    caplog.set_level(logging.ERROR, LOGGER)
    forged = "c-2\n2024-01-01 00:00:00,000 INFO tokenwire.server: all is well"
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Cancel(pb.CancelRequest(request_id=forged), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # such an id is refused first
        assert not [r for r in caplog.records if r.name == LOGGER]
        # Should one get past that check, the catch-all's line still escapes it.
        monkeypatch.setattr(servicer, "check_printable_id", lambda _request_id: None)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Cancel(pb.CancelRequest(request_id=forged), timeout=5)
    check_logged(caplog, "/tokenwire.v1.TokenWire/Cancel", forged)
    assert all("\n" not in r.getMessage() for r in caplog.records if r.name == LOGGER)


async def test_a_bug_in_the_generate_stream_answers_internal_naming_the_request(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug met while handling one message ends the stream with INTERNAL naming that message's request,
    and frees the stream's requests (it used to end the stream with OK, silently)."""
    engine = engine_of(server)
    real_abort = engine.abort
    calls = 0

    def abort_fails_once(*args: Any, **kwargs: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(SECRET)
        return real_abort(*args, **kwargs)

    caplog.set_level(logging.ERROR, LOGGER)
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.TokenWireStub(channel).Generate()
        start = pb.Start(request_id="g-1", prompt=" hello", stopping=pb.StoppingParams(max_tokens=200))
        await call.write(pb.GenerateRequest(start=start))
        assert (await asyncio.wait_for(call.read(), 5)).HasField("started")
        monkeypatch.setattr(engine, "abort", abort_fails_once)
        await call.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id="g-1")))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_rest(call, timeout=5)
    check_internal(caught.value, "internal error (request g-1); see the server log")
    check_logged(caplog, "/tokenwire.v1.TokenWire/Generate", "g-1")
    await wait_until_idle(engine)  # the stream's request was aborted (by the second, real abort)


async def test_deliberate_aborts_pass_through(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, LOGGER)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Cancel(pb.CancelRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "request_id: required"
        # A streaming handler that writes with context.write (health's Watch) still streams.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    assert not [r for r in caplog.records if r.name == LOGGER]


# ---- the interceptor alone, around handlers of every shape ----


async def _chosen_status(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.NOT_FOUND)
    raise LookupError("no such thing")  # the handler picked the code; grpc keeps it


async def _aborting(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")


async def _failing_stream(request: bytes, _context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield request
    raise RuntimeError(SECRET)


async def _failing_reader(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> None:  # request-streaming, writes its responses itself
    async for request in requests:
        await context.write(request)
    raise RuntimeError(SECRET)


def _service() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Shapes",
        {
            "Chosen": grpc.unary_unary_rpc_method_handler(_chosen_status),
            "Aborting": grpc.unary_unary_rpc_method_handler(_aborting),
            "Stream": grpc.unary_stream_rpc_method_handler(_failing_stream),
            "Reader": grpc.stream_stream_rpc_method_handler(_failing_reader),
        },
    )


async def test_every_handler_shape_is_guarded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, LOGGER)
    server = grpc.aio.server(interceptors=[CatchAllInterceptor()])
    server.add_generic_rpc_handlers((_service(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Shapes/Chosen")(b"x", timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Shapes/Aborting")(b"x", timeout=5)
            assert (caught.value.code(), caught.value.details()) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "not now",
            )
            assert not [r for r in caplog.records if r.name == LOGGER]

            stream = channel.unary_stream("/test.Shapes/Stream")(b"one", timeout=5)
            assert await stream.read() == b"one"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream.read()
            check_internal(caught.value, "internal error; see the server log")

            both = channel.stream_stream("/test.Shapes/Reader")(timeout=5)
            await both.write(b"two")
            assert await both.read() == b"two"
            await both.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await both.read()
            check_internal(caught.value, "internal error; see the server log")
        assert len([r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]) == 2
    finally:
        await server.stop(0)


@pytest.mark.parametrize("method", ["Cancel", "Tokenize", "GetModelInfo"])
async def test_bytes_that_are_not_the_request_answer_invalid_argument(
    server: RunningServer, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc decodes a single request before any handler runs, and answered UNKNOWN with the parser's
    exception text; the catch-all decodes it itself and names the RPC instead."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_unary(f"/tokenwire.v1.TokenWire/{method}")  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"\xff\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"the request is not a valid /tokenwire.v1.TokenWire/{method} request"
    assert not [r for r in caplog.records if r.name == LOGGER]
    async with grpc.aio.insecure_channel(server.address) as channel:  # and the server serves on
        info = await pb_grpc.TokenWireStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.context_length > 0
