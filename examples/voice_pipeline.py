"""A voice-pipeline style consumer: speak sentences as they arrive, stop the moment the user talks.

    .venv/bin/python examples/voice_pipeline.py [ADDRESS] [SEGMENTS_BEFORE_BARGE_IN]

Speech-to-text hands over the user's words, the model answers in sentences (sentence chunking: each
chunk ends exactly at a sentence boundary and says so with `segment_end`, so text-to-speech needs no
splitter of its own), and a simulated barge-in after N spoken sentences interrupts the generation.
The server's acknowledged stop (Finished) says exactly how much text it had sent; the pipeline
compares that with what it actually spoke, and the next turn cuts the session's reply to what the
user heard before going on.

Only complete sentences are spoken. A generation cut off by max_tokens (or by a time limit) ends with
a chunk whose `segment_end` is false: half a sentence. The pipeline keeps it back, reports it as never
played, and the next turn of the session drops it (truncate_reply_chars: what was heard).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from dataclasses import dataclass

from tokenwire.client import AsyncClient, AsyncGeneration, Result

SPEAKING_S = 0.05  # a stand-in for the time text-to-speech takes to say a sentence


@dataclass
class Turn:
    """What happened to one reply: the text spoken, the server's summary, the text held back."""

    spoken: str
    result: Result
    unspoken: str  # received but never spoken: an unfinished sentence


async def speak(generation: AsyncGeneration, barge_in_after: int | None = None) -> Turn:
    """Say each complete sentence as it comes; after `barge_in_after` of them the user starts talking."""
    spoken: list[str] = []
    pending = ""  # text of a sentence that has not ended yet
    async for chunk in generation:
        pending += chunk.text
        if not chunk.segment_end:
            continue  # half a sentence (cut by max_tokens): never hand it to text-to-speech
        print(f"speak: {pending.strip()}", flush=True)
        await asyncio.sleep(SPEAKING_S)
        spoken.append(pending)
        pending = ""
        if len(spoken) == barge_in_after:
            print("barge-in: the user started talking")
            result = await generation.interrupt()  # stops at the next decode step
            # Chunks the server sent before it stopped may still be on their way: none is spoken.
            async for chunk in generation:
                pending += chunk.text
            return Turn("".join(spoken), result, pending)
    return Turn("".join(spoken), generation.result, pending)


async def main(address: str, barge_in_after: int) -> None:
    session = f"voice-{uuid.uuid4().hex[:8]}"  # the server keeps the conversation and its KV cache
    async with AsyncClient(address) as client, client.stream() as stream:
        question = "Tell me about the history of lighthouses, in several short sentences."
        print(f"user: {question}")
        answer = await stream.start(
            messages=[{"role": "user", "content": question}],
            session_id=session,
            chunking="sentence",
            max_tokens=200,
        )
        turn = await speak(answer, barge_in_after)
        result = turn.result
        heard = turn.spoken
        sent = result.text[: result.sent_text_chars]
        print(f"stopped: {result.reason} after {result.sent_tokens} tokens")
        print(f"sent: {result.sent_text_chars} characters, spoken: {len(heard)}")
        print(f"heard: {heard.strip()!r}")
        if len(sent) > len(heard):
            print(f"never played: {sent[len(heard) :].strip()!r}")

        # The next turn: the session forgets the unheard part of the reply, and reuses the cached rest.
        follow_up = "Wait, go back: who built the first one?"
        print(f"user: {follow_up}")
        reply = await stream.start(
            messages=[{"role": "user", "content": follow_up}],
            session_id=session,
            truncate_reply_chars=len(heard),
            chunking="sentence",
            max_tokens=40,
        )
        turn = await speak(reply)
        if turn.unspoken.strip():
            # A further turn would pass truncate_reply_chars=len(turn.spoken) to drop it from the session.
            print(f"not spoken ({turn.result.reason}, mid-sentence): {turn.unspoken.strip()!r}")
        print(f"cached prompt tokens: {reply.result.cached_prompt_tokens} of {reply.result.prompt_tokens}")


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    asyncio.run(main(address, int(sys.argv[2]) if len(sys.argv) > 2 else 2))
