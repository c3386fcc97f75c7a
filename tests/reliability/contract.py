"""The contract's per-request rules, checked on what a client read: lifecycles, terminals, error shapes."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import grpc

from tokenwire.v1 import tokenwire_pb2 as pb

INVALID, NOT_FOUND, EXISTS, EXHAUSTED, PRECONDITION = 3, 5, 6, 8, 9
# Codes a per-request Error may carry without anything being wrong with the server (INTERNAL is a bug).
REQUEST_ERROR_CODES = {INVALID, NOT_FOUND, EXISTS, EXHAUSTED, PRECONDITION}


def start(
    request_id: str, max_tokens: int | None = 20, prompt: str = " hello world", **fields: object
) -> pb.GenerateRequest:
    """A GenerateRequest starting one generation (max_tokens None: until the context is full)."""
    stopping = fields.pop("stopping", pb.StoppingParams(max_tokens=max_tokens))
    return pb.GenerateRequest(
        start=pb.Start(request_id=request_id, prompt=prompt, stopping=stopping, **fields)  # type: ignore[arg-type]
    )


def interrupt(request_id: str, mode: int = pb.INTERRUPT_MODE_IMMEDIATE) -> pb.GenerateRequest:
    return pb.GenerateRequest(interrupt=pb.Interrupt(request_id=request_id, mode=mode))  # type: ignore[arg-type]


def heartbeat() -> pb.GenerateRequest:
    """A client's keep-alive: the server ignores it (it counts as a message read) and answers nothing."""
    return pb.GenerateRequest(heartbeat=pb.Heartbeat())


def kind(response: pb.GenerateResponse) -> str:
    return response.WhichOneof("kind") or ""


def is_heartbeat(response: pb.GenerateResponse) -> bool:
    """The server's keep-alive on a quiet stream: no request id, part of no request's lifecycle."""
    if kind(response) != "heartbeat":
        return False
    assert response.request_id == "", f"a Heartbeat names a request: {response.request_id!r}"
    return True


def is_terminal(response: pb.GenerateResponse) -> bool:
    return kind(response) in ("finished", "error")


def by_request(responses: Iterable[pb.GenerateResponse]) -> dict[str, list[pb.GenerateResponse]]:
    """Responses grouped by request id; the server's Heartbeats (which may come at any time) left out."""
    grouped: dict[str, list[pb.GenerateResponse]] = defaultdict(list)
    for response in responses:
        if not is_heartbeat(response):
            grouped[response.request_id].append(response)
    return grouped


def check_error(error: pb.Error) -> None:
    """A per-request Error as the contract shapes it: a known code, and the field for bad input."""
    assert error.code in REQUEST_ERROR_CODES, f"unexpected error code {error.code}: {error.message}"
    assert error.message, "an Error must say what went wrong"
    if error.code == INVALID:
        assert error.field, f"INVALID_ARGUMENT without a field: {error.message}"
        assert error.field in error.message, (error.field, error.message)


def check_generation(responses: Sequence[pb.GenerateResponse], *, token_ids: bool = False) -> pb.Finished:
    """One accepted request: Started, Chunk*, exactly one Finished, last; Finished matches the chunks."""
    kinds = [kind(r) for r in responses]
    assert kinds and kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert set(kinds[1:-1]) <= {"chunk"}, kinds
    started, finished = responses[0].started, responses[-1].finished
    chunks = [r.chunk for r in responses[1:-1]]
    text = "".join(c.text for c in chunks)
    assert all(c.text or c.segment_end for c in chunks), "empty chunks are not sent"
    assert finished.sent_text_chars == len(text), (finished.sent_text_chars, len(text))
    assert finished.sent_tokens <= finished.usage.completion_tokens <= started.max_tokens
    assert finished.usage.prompt_tokens == started.prompt_tokens
    indexes = [c.index for c in chunks]
    assert indexes == sorted(indexes) and (not chunks or chunks[0].index == 0), indexes
    if token_ids:  # every chunk says exactly which tokens it covers, in order
        covered = 0
        for chunk in chunks:
            assert chunk.index == covered, (chunk.index, covered)
            covered += len(chunk.token_ids)
        assert finished.sent_tokens == covered
    assert finished.reason != pb.STOP_REASON_UNSPECIFIED
    return finished


def check_chunk_tokens(
    chunks: Sequence[tuple[str, Sequence[int]]],
    generated: Sequence[int],
    text_of: Callable[[Sequence[int]], str],
) -> None:
    """Chunk.token_ids as the .proto defines them: each token is in the one chunk where its text starts.

    `chunks` are (text, token ids) in order; `generated` every token the request generated;
    `text_of(ids)` the text those ids complete, as a plain decode renders it (the bytes of a
    character that only a later token completes left out). A token's text starts where the text of
    the tokens before it ends; so a token's chunk is the one that text ends in, and a token whose text
    was never sent (a stop string, EOS) is in none. Then a chunk's tokens decode to its text, but for
    a token's text split over two chunks (it counts in the first), and held-back text.
    """
    ids = [t for _, chunk_ids in chunks for t in chunk_ids]
    assert list(generated[: len(ids)]) == ids, "the chunks cover the first tokens, in order"
    sent = "".join(text for text, _ in chunks)
    before, i = "", 0  # the text of the chunks before this one; the tokens they hold
    for text, chunk_ids in chunks:
        upto = before + text
        for _ in chunk_ids:
            head = text_of(generated[:i])
            assert upto.startswith(head) and len(before) <= len(head) < len(upto), (i, head, upto)
            i += 1
        assert text_of(generated[:i]).startswith(upto), ("text sent ahead of its tokens", i, upto)
        before = upto
    for j in range(i, len(generated)):
        assert len(text_of(generated[:j])) >= len(sent), ("a token of sent text is in no chunk", j)


def split_runs(responses: Sequence[pb.GenerateResponse]) -> list[list[pb.GenerateResponse]]:
    """One id's responses cut into its requests' lifecycles: a lone Error, or Started..Finished.

    The same id may be used again once its request ended, and a refused duplicate's Error can
    arrive among the live one's chunks; so Errors stand alone and the rest must nest properly."""
    runs: list[list[pb.GenerateResponse]] = []
    current: list[pb.GenerateResponse] | None = None
    for response in responses:
        k = kind(response)
        if k == "error":
            runs.append([response])
        elif k == "started":
            assert current is None, "Started while the same id is still running"
            current = [response]
        else:
            assert current is not None, f"{k} outside a Started..Finished run"
            current.append(response)
            if k == "finished":
                runs.append(current)
                current = None
    assert current is None, "a run never finished"
    return runs


async def read_until_done(
    call: grpc.aio.StreamStreamCall, ids: Iterable[str], timeout: float = 10.0
) -> list[pb.GenerateResponse]:
    """Read until each of `ids` had its terminal message; returns everything read."""
    pending, seen = set(ids), list[pb.GenerateResponse]()

    async def run() -> None:
        while pending:
            response = await call.read()
            assert response is not grpc.aio.EOF, f"stream ended with {sorted(pending)} unfinished"
            seen.append(response)
            if is_terminal(response):
                pending.discard(response.request_id)

    await asyncio.wait_for(run(), timeout)
    return seen


async def read_rest(call: grpc.aio.StreamStreamCall, timeout: float = 10.0) -> list[pb.GenerateResponse]:
    """Read to the end of the stream with read() (grpc forbids mixing it with `async for`)."""

    async def run() -> list[pb.GenerateResponse]:
        seen: list[pb.GenerateResponse] = []
        while (response := await call.read()) is not grpc.aio.EOF:
            seen.append(response)
        return seen

    return await asyncio.wait_for(run(), timeout)


async def read_first_chunk(
    call: grpc.aio.StreamStreamCall, request_id: str, seen: list[pb.GenerateResponse], timeout: float = 10.0
) -> None:
    """Read (into `seen`) until `request_id` has sent a chunk, so it is surely running."""

    async def run() -> None:
        while True:
            response = await call.read()
            assert response is not grpc.aio.EOF, f"stream ended before {request_id} sent a chunk"
            seen.append(response)
            if response.request_id == request_id and kind(response) == "chunk":
                return
            assert not (response.request_id == request_id and is_terminal(response)), response

    await asyncio.wait_for(run(), timeout)
