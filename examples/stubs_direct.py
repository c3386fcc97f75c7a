"""A service that talks to tokenwire with the generated stubs alone (grpc.aio, no tokenwire.client).

    python examples/stubs_direct.py [ADDRESS]

It asks for the model, then runs two generations on one Generate stream: it interrupts the first
after a few chunks and lets the second run to its end, then half-closes the stream. Every Start gets
exactly one Finished (or Error), so the loop knows when it is done without counting anything else.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

INTERRUPT_AFTER_CHUNKS = 3


def start(request_id: str, text: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        start=pb.Start(
            request_id=request_id,
            chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=text)]),
            stopping=pb.StoppingParams(max_tokens=max_tokens),
            output=pb.OutputOptions(chunking=pb.CHUNKING_WORD),
        )
    )


async def main(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, wait_for_ready=True)
        print(f"model: {info.model} (context {info.context_length} tokens, batch {info.max_batch_size})")

        call = stub.Generate()  # the stream stays open: Interrupts go on it too
        await call.write(start("story", "Tell me a long story about a lighthouse keeper.", 200))
        await call.write(start("haiku", "Write a haiku about the sea.", 24))

        texts: dict[str, list[str]] = {"story": [], "haiku": []}
        open_requests = set(texts)
        while open_requests:
            response = await call.read()
            if response == grpc.aio.EOF:
                raise RuntimeError("the stream ended early")
            request_id, kind = response.request_id, response.WhichOneof("kind")
            if kind == "chunk":
                texts[request_id].append(response.chunk.text)
                if request_id == "story" and len(texts["story"]) == INTERRUPT_AFTER_CHUNKS:
                    interrupt = pb.Interrupt(request_id="story", mode=pb.INTERRUPT_MODE_IMMEDIATE)
                    await call.write(pb.GenerateRequest(interrupt=interrupt))
            elif kind == "finished":
                finished = response.finished
                reason = pb.StopReason.Name(finished.reason)
                print(f"{request_id}: {reason}, {finished.usage.completion_tokens} tokens")
                print(f"{request_id} text: {''.join(texts[request_id])!r}")
                open_requests.discard(request_id)
            elif kind == "error":
                print(f"{request_id}: error {response.error.code} {response.error.message}")
                open_requests.discard(request_id)
        await call.done_writing()  # "no more requests": the server then ends the RPC with OK
        print(f"stream: {await call.code()}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
