"""A voice-pipeline style consumer: speak sentences as they arrive, stop the moment the user talks.

    python examples/voice_pipeline.py [ADDRESS] [SEGMENTS_BEFORE_BARGE_IN]

Speech-to-text hands over the user's words, the model answers in sentences (sentence chunking: each
chunk ends exactly at a sentence boundary, so text-to-speech needs no splitter of its own), and a
simulated barge-in after N spoken sentences interrupts the generation. The server's acknowledged stop
(Finished) says exactly how much text it had sent; the pipeline compares that with what it actually
spoke, and the next turn cuts the session's reply to what the user heard before going on.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from tokenwire.client import AsyncClient, AsyncGeneration, Result

SPEAKING_S = 0.05  # a stand-in for the time text-to-speech takes to say a sentence


async def speak_until_barge_in(generation: AsyncGeneration, barge_in_after: int) -> tuple[str, Result]:
    """Say each sentence as it comes; after `barge_in_after` of them the user starts talking."""
    spoken: list[str] = []
    async for segment in generation:
        print(f"speak: {segment.text.strip()}", flush=True)
        await asyncio.sleep(SPEAKING_S)
        spoken.append(segment.text)
        if len(spoken) == barge_in_after:
            print("barge-in: the user started talking")
            return "".join(spoken), await generation.interrupt()  # stops at the next decode step
    return "".join(spoken), generation.result


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
        heard, result = await speak_until_barge_in(answer, barge_in_after)
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
        async for segment in reply:
            print(f"speak: {segment.text.strip()}", flush=True)
        print(f"cached prompt tokens: {reply.result.cached_prompt_tokens} of {reply.result.prompt_tokens}")


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    asyncio.run(main(address, int(sys.argv[2]) if len(sys.argv) > 2 else 2))
