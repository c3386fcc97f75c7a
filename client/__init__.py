"""The tokenwire client: stream tokens from a tokenwire server, and interrupt them; never imports torch.

    from tokenwire.client import Client

    with Client("127.0.0.1:50051") as client:
        generation = client.generate("The capital of France is", max_tokens=16, chunking="word")
        for chunk in generation:
            print(chunk.text, end="", flush=True)
        print(generation.result.reason, generation.result.usage)

        with client.stream() as stream:  # several generations on one Generate RPC
            story = stream.start(messages=[{"role": "user", "content": "A story"}], chunking="sentence")
            for sentence in story:
                speak(sentence.text)
                if user_started_talking():
                    stop = story.interrupt()  # the acknowledged stop: stop.sent_text_chars were sent
                    break

`AsyncClient` is the same API for asyncio (`async for`, `await`; its `generate()` returns at once).
Failures raise one exception tree under TokenWireError (drawn in `tokenwire.client._errors`); each
keeps the gRPC status code and the field at fault. The `tokenwire` command is `tokenwire.client.cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from ._async import AsyncClient, AsyncGeneration, AsyncStream
    from ._errors import (
        AlreadyExists,
        Cancelled,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        ServerError,
        TokenWireError,
        Unauthenticated,
        Unavailable,
    )
    from ._sync import Client, Generation, Stream

# The names from modules that import grpc, loaded on first use: importing the package (as the
# `tokenwire` command does, before it has read its flags) does not load grpc, whose C core reads its
# logging settings (GRPC_VERBOSITY, GRPC_TRACE) once, when it loads.
_LAZY = {
    **dict.fromkeys(("AsyncClient", "AsyncGeneration", "AsyncStream"), "._async"),
    **dict.fromkeys(("Client", "Generation", "Stream"), "._sync"),
    **dict.fromkeys(
        (
            "AlreadyExists",
            "Cancelled",
            "DeadlineExceeded",
            "FailedPrecondition",
            "InvalidArgument",
            "NotFound",
            "ResourceExhausted",
            "ServerError",
            "TokenWireError",
            "Unauthenticated",
            "Unavailable",
        ),
        "._errors",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncGeneration",
    "AsyncStream",
    "CancelResult",
    "Cancelled",
    "Chunk",
    "Chunking",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GenerateOptions",
    "Generation",
    "HealthStatus",
    "InterruptMode",
    "InvalidArgument",
    "Message",
    "MessageLike",
    "ModelInfo",
    "NotFound",
    "ResourceExhausted",
    "Result",
    "ServerError",
    "StopReason",
    "Stream",
    "Summary",
    "Timings",
    "TokenLogprob",
    "TokenWireError",
    "Tokens",
    "TopLogprob",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
