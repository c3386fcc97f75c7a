"""The engine against a fake model runner: ordering, stopping, aborts in every phase, no leftovers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.conftest import wait_until_idle
from tests.fake_runner import EOS, FakeRunner, ForwardGate, make_tokenizer, token_id
from tests.reliability.contract import check_chunk_tokens
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import (
    Chunking,
    Delta,
    ErrorCode,
    Failure,
    Finished,
    GenerationRequest,
    OutputOptions,
    PromptInput,
    RequestError,
    RequestField,
    Started,
    StoppingParams,
    StopReason,
)
from tokenwire.service.engine.scheduler import Phase

HELLO, WORLD, CAT, DOT = token_id("Ġhello"), token_id("Ġworld"), token_id("Ġcat"), token_id(".")


def request(
    request_id: str = "r", ids: tuple[int, ...] = (HELLO,), max_tokens: int | None = 8, **kw: object
) -> GenerationRequest:
    stopping = kw.pop("stopping", StoppingParams(max_tokens=max_tokens))
    return GenerationRequest(request_id, PromptInput(token_ids=ids), stopping=stopping, **kw)  # type: ignore[arg-type]


async def collect(stream: object) -> list[object]:
    return [item async for item in stream]  # type: ignore[attr-defined]


async def wait_idle(engine: Engine) -> None:
    await wait_until_idle(engine, timeout=5.0)


@pytest.fixture
async def engine():
    runner = FakeRunner(max_batch_size=4, context_length=256)
    eng = Engine(runner, EngineConfig(max_batch_size=4, prefill_tokens_per_step=4, max_live_requests=8))
    eng.start()
    yield eng
    await eng.stop()


@pytest.fixture
def gate(engine: Engine) -> Iterator[ForwardGate]:
    """The fake model held at the start of each forward until the test lets it through (closed at
    first; opened at the end so the engine can stop)."""
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    gate = ForwardGate()
    runner.on_forward = gate
    yield gate
    runner.on_forward = None
    gate.open()


async def test_outputs_in_order_and_one_finish(engine: Engine) -> None:
    items = await collect(engine.add_request(request(max_tokens=5)))
    assert isinstance(items[0], Started) and items[0].prompt_tokens == 1
    assert all(isinstance(i, Delta) for i in items[1:-1])
    finished = items[-1]
    assert isinstance(finished, Finished) and finished.reason is StopReason.MAX_TOKENS
    assert finished.usage.completion_tokens == 5
    text = "".join(i.text for i in items if isinstance(i, Delta))
    assert finished.sent_text_chars == len(text) and finished.sent_tokens == 5
    await wait_idle(engine)


async def test_a_length_cut_inside_a_character_still_sends_its_token_ids(engine: Engine) -> None:
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    stray_byte = token_id("µ")
    runner.script[WORLD] = [CAT, stray_byte, stray_byte]
    items = await collect(engine.add_request(request("a", (WORLD,), max_tokens=3)))
    deltas = [i for i in items if isinstance(i, Delta)]
    assert [t for d in deltas for t in d.token_ids] == [CAT, stray_byte, stray_byte]
    # As a plain decode renders the ids: the bytes that never formed a character become U+FFFD.
    assert "".join(d.text for d in deltas) == make_tokenizer().decode([CAT, stray_byte, stray_byte])
    assert all(d.text for d in deltas)
    finished = items[-1]
    assert isinstance(finished, Finished) and finished.reason is StopReason.MAX_TOKENS
    assert finished.sent_tokens == finished.usage.completion_tokens == 3


async def test_eos_stop_token_and_stop_string(engine: Engine) -> None:
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    runner.script[WORLD] = [CAT, DOT, CAT, CAT]
    items = await collect(engine.add_request(request("a", (WORLD,), max_tokens=20)))
    assert items[-1].reason is StopReason.EOS  # type: ignore[attr-defined]
    assert items[-1].usage.completion_tokens == 5  # type: ignore[attr-defined]

    items = await collect(
        engine.add_request(
            request("b", (WORLD,), stopping=StoppingParams(max_tokens=20, stop_token_ids=(DOT,)))
        )
    )
    assert items[-1].reason is StopReason.STOP_SEQUENCE and items[-1].stop_sequence == str(DOT)  # type: ignore[attr-defined]
    assert "".join(i.text for i in items if isinstance(i, Delta)) == " cat"

    items = await collect(
        engine.add_request(request("c", (WORLD,), stopping=StoppingParams(max_tokens=20, stop=(". cat",))))
    )
    assert items[-1].reason is StopReason.STOP_SEQUENCE and items[-1].stop_sequence == ". cat"  # type: ignore[attr-defined]
    assert "".join(i.text for i in items if isinstance(i, Delta)) == " cat"


# " world. Dr. Smith, cat\ufffd\ufffd sat. hello": sentences, a clause, bytes that never form a character.
STORY = [WORLD, DOT, token_id("ĠDr"), DOT, token_id("ĠSmith"), token_id(","), CAT]
STORY += [token_id("µ"), token_id("µ"), token_id("Ġsat"), DOT, HELLO]
ENDINGS = {  # how the story ends: (max_tokens, stop strings, stop token ids)
    "eos": (40, (), ()),
    "max_tokens_inside_a_character": (8, (), ()),
    "stop_string": (40, (", cat",), ()),
    "stop_string_prefix_held_to_the_end": (40, (" hello there",), ()),
    "stop_token_id": (40, (), (token_id("Ġsat"),)),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_each_token_is_in_the_chunk_its_text_starts_in(engine: Engine, ending: str) -> None:
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    runner.script[WORLD] = STORY
    max_tokens, stop, stop_token_ids = ENDINGS[ending]
    stopping = StoppingParams(max_tokens=max_tokens, stop=stop, stop_token_ids=stop_token_ids)
    sent: dict[Chunking, tuple[str, list[int]]] = {}
    for chunking in Chunking:
        output = OutputOptions(chunking=chunking, logprobs=True, token_ids=True)
        items = await collect(
            engine.add_request(request(chunking.value, (WORLD,), stopping=stopping, output=output))
        )
        deltas = [i for i in items if isinstance(i, Delta)]
        finished = items[-1]
        assert isinstance(finished, Finished)
        generated = [*STORY, EOS][: finished.usage.completion_tokens]
        check_chunk_tokens([(d.text, d.token_ids) for d in deltas], generated, runner.tokenizer.decode)
        covered = 0
        for d in deltas:
            assert d.index == covered  # the index of its first token
            assert [lp.token_id for lp in d.logprobs] == d.token_ids
            covered += len(d.token_ids)
        assert finished.sent_tokens == covered
        sent[chunking] = ("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids])
        if chunking is Chunking.WORD:  # a word's tokens are its chunk's, and decode to its text
            assert all(runner.tokenizer.decode(d.token_ids) == d.text for d in deltas)
    assert all(s == sent[Chunking.TOKEN] for s in sent.values()), sent


async def test_min_tokens_bans_eos(engine: Engine) -> None:
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    runner.script[WORLD] = [EOS]
    items = await collect(
        engine.add_request(request("m", (WORLD,), stopping=StoppingParams(max_tokens=10, min_tokens=3)))
    )
    finished = items[-1]
    assert isinstance(finished, Finished) and finished.usage.completion_tokens >= 3


async def test_context_length_limit(engine: Engine) -> None:
    items = await collect(engine.add_request(request("ctx", (HELLO,) * 252, max_tokens=None)))
    finished = items[-1]
    assert isinstance(finished, Finished) and finished.reason is StopReason.CONTEXT_LENGTH
    assert finished.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("req", "code", "field"),
    [
        (request("e", ()), ErrorCode.INVALID_ARGUMENT, RequestField.INPUT),
        (request("e", (999,)), ErrorCode.INVALID_ARGUMENT, RequestField.TOKEN_IDS),
        (request("e", (HELLO,) * 256), ErrorCode.INVALID_ARGUMENT, RequestField.INPUT),
        (request("e", (HELLO,) * 10, max_tokens=250), ErrorCode.INVALID_ARGUMENT, RequestField.MAX_TOKENS),
        (
            request("e", stopping=StoppingParams(max_tokens=3, stop_token_ids=(999,))),
            ErrorCode.INVALID_ARGUMENT,
            RequestField.STOP_TOKEN_IDS,
        ),
        (request("x" * 129), ErrorCode.INVALID_ARGUMENT, RequestField.REQUEST_ID),
    ],
)
async def test_bad_requests_name_their_field(
    engine: Engine, req: GenerationRequest, code: ErrorCode, field: RequestField
) -> None:
    with pytest.raises(RequestError) as caught:
        engine.add_request(req)
    assert caught.value.code is code and caught.value.field is field
    assert engine.is_idle()


async def test_duplicate_live_id_and_limit(engine: Engine, gate: ForwardGate) -> None:
    # The gate holds the model: no request can end while the test fills the registry.
    first = engine.add_request(request("dup", max_tokens=30))
    with pytest.raises(RequestError) as caught:
        engine.add_request(request("dup"))
    assert caught.value.code is ErrorCode.ALREADY_EXISTS
    streams = [engine.add_request(request(f"n{i}", max_tokens=30)) for i in range(7)]
    with pytest.raises(RequestError) as caught:
        engine.add_request(request("over"))
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    for s in [first, *streams]:
        engine.abort(s.request_id, StopReason.CANCELLED)
    gate.open()
    await asyncio.gather(*(collect(s) for s in [first, *streams]))
    await wait_idle(engine)
    # The id is free again once its request ended.
    assert (await collect(engine.add_request(request("dup", max_tokens=2))))[
        -1
    ].reason is StopReason.MAX_TOKENS  # type: ignore[attr-defined]


async def test_abort_while_waiting_in_prefill_and_decoding(engine: Engine, gate: ForwardGate) -> None:
    streams = {"blocker": engine.add_request(request("blocker", max_tokens=40))}
    await gate.held(1)  # the step thread now sits in the blocker's prefill
    for rid, ids in [("r0", (HELLO,)), ("r1", (HELLO,)), ("long", (HELLO,) * 12), ("w", (HELLO,))]:
        streams[rid] = engine.add_request(request(rid, ids, max_tokens=40))
    gate.allow(2)  # step 1 ends (the blocker's prefill, then its first decode)
    await gate.held(3)  # step 2 admitted r0, r1, long (4 rows in all) and is prefilling them
    scheduled = {rid: engine.scheduler.get(engine._live[("", rid)].seq_id) for rid in ("long", "w")}
    assert scheduled["w"].phase is Phase.WAITING  # type: ignore[union-attr]
    assert scheduled["long"].phase is Phase.PREFILL  # type: ignore[union-attr]
    assert engine.abort("w", StopReason.CANCELLED)
    assert engine.abort("long", StopReason.INTERRUPTED)
    # One forward at a time until both have ended (a step sends its outputs before the next forward),
    # so r0 is still mid-generation, held, when it is interrupted below.
    for forwards in range(11):
        if streams["w"].done and streams["long"].done:
            break
        assert forwards < 10, "the aborts were never applied"
        await gate.advance()
    w = await collect(streams["w"])
    # Stopped while waiting: Started (never admitted: no cached tokens) then Finished, as always.
    assert [type(i) for i in w] == [Started, Finished] and w[1].reason is StopReason.CANCELLED
    long = await collect(streams["long"])
    assert long[-1].reason is StopReason.INTERRUPTED and long[-1].usage.completion_tokens == 0  # type: ignore[attr-defined]
    assert engine.scheduler.get(engine._live[("", "r0")].seq_id).phase is Phase.DECODE  # type: ignore[union-attr]
    assert engine.abort("r0", StopReason.INTERRUPTED)  # decoding
    gate.open()
    r0 = await collect(streams["r0"])
    assert r0[-1].reason is StopReason.INTERRUPTED and 0 < r0[-1].usage.completion_tokens < 40  # type: ignore[attr-defined]
    for rid in ("r1", "blocker"):
        engine.abort(rid, StopReason.CANCELLED)
        await collect(streams[rid])
    await wait_idle(engine)
    assert not engine.abort("r0", StopReason.CANCELLED)  # idempotent: no longer live


async def test_cancel_returns_summary_and_is_idempotent(engine: Engine, gate: ForwardGate) -> None:
    stream = engine.add_request(request("c1", max_tokens=60))
    gate.allow(2)
    await gate.held(3)  # two tokens out, the model held in the third: mid-generation
    # cancel() queues its abort before it first waits, and only then does this callback run: the held
    # forward ends, and the next step applies the cancel (the generation cannot run to its end first).
    asyncio.get_running_loop().call_soon(gate.open)
    summary = await engine.cancel("c1")
    assert summary is not None and summary.reason is StopReason.CANCELLED
    items = await collect(stream)
    assert items[-1] == summary
    assert summary.sent_tokens == sum(len(i.token_ids) for i in items if isinstance(i, Delta))
    assert await engine.cancel("c1") is None
    assert await engine.cancel("never") is None
    await wait_idle(engine)


async def test_interrupt_after_segment_finishes_the_sentence(engine: Engine, gate: ForwardGate) -> None:
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    smith, sat = token_id("ĠSmith"), token_id("Ġsat")
    runner.script[WORLD] = [smith, sat, DOT, smith, CAT, sat, DOT, smith, CAT, sat, DOT] * 3
    stream = engine.add_request(
        request("seg", (WORLD,), max_tokens=40, output=OutputOptions(chunking=Chunking.SENTENCE))
    )
    gate.allow(5)  # " Smith sat. Smith cat": the first sentence is out, the second under way
    await gate.held(6)
    seen: list[object] = []
    async for item in stream:
        seen.append(item)
        if isinstance(item, Delta) and len(seen) == 2:
            engine.abort("seg", StopReason.INTERRUPTED, after_segment=True)
            gate.open()
    deltas = [i for i in seen if isinstance(i, Delta)]
    assert all(d.segment_end for d in deltas)
    assert seen[-1].reason is StopReason.INTERRUPTED  # type: ignore[attr-defined]
    assert "".join(d.text for d in deltas).endswith(".")


async def test_step_failure_ends_every_request(engine: Engine, gate: ForwardGate) -> None:
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    streams = [engine.add_request(request(f"f{i}", max_tokens=30)) for i in range(3)]
    await gate.held()
    while len(engine.scheduler) < 3:  # a step may have begun before the last ones arrived
        await gate.advance()
    runner.fail = RuntimeError("boom")  # the held forward raises: all three are in the engine
    gate.open()
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 5)
    for items in results:
        assert isinstance(items[-1], Finished) and items[-1].reason is StopReason.ERROR
    await wait_idle(engine)
    # The engine keeps serving afterwards.
    assert (await collect(engine.add_request(request("after", max_tokens=2))))[
        -1
    ].reason is StopReason.MAX_TOKENS  # type: ignore[attr-defined]


async def test_slow_reader_gets_merged_chunks(engine: Engine) -> None:
    stream = engine.add_request(request("slow", max_tokens=60))
    await asyncio.wait_for(stream.result, 5)
    items = await collect(stream)
    deltas = [i for i in items if isinstance(i, Delta)]
    assert len(deltas) <= engine.config.output_buffer
    assert sum(len(d.token_ids) for d in deltas) == 60
    assert [d.index for d in deltas] == sorted(d.index for d in deltas)


async def test_deadline(engine: Engine) -> None:
    engine.runner.step_delay = 0.01  # type: ignore[attr-defined]
    items = await collect(
        engine.add_request(request("t", stopping=StoppingParams(max_tokens=60, time_limit_s=0.1)))
    )
    assert items[-1].reason is StopReason.DEADLINE  # type: ignore[attr-defined]
    await wait_idle(engine)


async def test_failure_type_for_shutdown(engine: Engine) -> None:
    await engine.stop()
    with pytest.raises(RequestError) as caught:
        engine.add_request(request("late"))
    assert caught.value.code is ErrorCode.UNAVAILABLE
    assert not isinstance(caught.value, Failure)


async def test_session_reuses_prefix_and_truncates(engine: Engine) -> None:
    from tokenwire.service.engine.requests import SessionTruncation

    turn1 = GenerationRequest(
        "s1",
        PromptInput(chat=(("user", " hello world"),)),
        stopping=StoppingParams(max_tokens=4),
        session_id="conv",
    )
    items = await collect(engine.add_request(turn1))
    assert items[0].cached_prompt_tokens == 0  # type: ignore[attr-defined]
    reply = "".join(i.text for i in items if isinstance(i, Delta))
    turn2 = GenerationRequest(
        "s2", PromptInput(chat=(("user", " cat"),)), stopping=StoppingParams(max_tokens=2), session_id="conv"
    )
    items2 = await collect(engine.add_request(turn2))
    started = items2[0]
    assert isinstance(started, Started) and started.cached_prompt_tokens > len(turn1.prompt_token_ids) - 1
    # Another session id sees nothing of it.
    other = GenerationRequest(
        "s3", PromptInput(chat=(("user", " cat"),)), stopping=StoppingParams(max_tokens=2), session_id="other"
    )
    assert (await collect(engine.add_request(other)))[0].cached_prompt_tokens == 0  # type: ignore[attr-defined]
    # Truncating to one heard token removes the rest of the reply from the next turn's prompt.
    turn3 = GenerationRequest(
        "s4",
        PromptInput(chat=(("user", " mat"),)),
        stopping=StoppingParams(max_tokens=2),
        session_id="conv",
        truncation=SessionTruncation(reply_tokens=0),
    )
    await collect(engine.add_request(turn3))
    assert len(turn3.prompt_token_ids) < len(turn2.prompt_token_ids) + 3 + len(reply.split())
    await wait_idle(engine)


async def test_after_segment_gives_up_when_the_segment_never_ends(engine: Engine, gate: ForwardGate) -> None:
    from tokenwire.service.engine.engine import AFTER_SEGMENT_MAX_TOKENS

    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    runner.script[WORLD] = [CAT] * 200  # " cat cat cat ..." never closes a sentence
    options = OutputOptions(chunking=Chunking.SENTENCE)
    stream = engine.add_request(request("endless", (WORLD,), max_tokens=200, output=options))
    gate.allow(2)
    await gate.held(3)  # " cat cat": a sentence under way
    engine.abort("endless", StopReason.INTERRUPTED, after_segment=True)
    gate.open()
    items = await collect(stream)
    finished = items[-1]
    assert isinstance(finished, Finished) and finished.reason is StopReason.INTERRUPTED
    # Three tokens when the interrupt was applied (the held forward ends first), then the cap.
    assert finished.usage.completion_tokens == 3 + AFTER_SEGMENT_MAX_TOKENS
    assert finished.tail_text.strip().startswith("cat")  # the unfinished sentence was never sent


async def test_a_length_cut_does_not_claim_a_segment_end(engine: Engine) -> None:
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    smith, sat = token_id("ĠSmith"), token_id("Ġsat")
    runner.script[WORLD] = [smith, sat, DOT, smith, CAT, sat]
    options = OutputOptions(chunking=Chunking.SENTENCE)
    items = await collect(engine.add_request(request("cut", (WORLD,), max_tokens=6, output=options)))
    deltas = [i for i in items if isinstance(i, Delta)]
    assert [(d.text, d.segment_end) for d in deltas] == [(" Smith sat.", True), (" Smith cat sat", False)]
    runner.script[WORLD] = [smith, sat, DOT, smith, CAT]  # then EOS: the text ended on its own
    items = await collect(engine.add_request(request("eos", (WORLD,), max_tokens=20, output=options)))
    assert [d.segment_end for d in items if isinstance(d, Delta)] == [True, True]


async def test_started_reports_the_time_spent_waiting_for_a_row(engine: Engine, gate: ForwardGate) -> None:
    streams = [engine.add_request(request(f"q{i}", max_tokens=10)) for i in range(5)]  # 4 rows
    gate.open()  # only now can a first token come: every request arrived before any first token
    results = await asyncio.gather(*(collect(s) for s in streams))
    queued = [items[0].queue_s for items in results]  # type: ignore[attr-defined]
    assert min(queued) < max(queued)  # the fifth waited for a row to free
    # It was admitted only after another request had finished (decoding from its first token on) and
    # freed its row: so it waited at least as long as the shortest of those decodes.
    waited = queued.index(max(queued))
    decoding = [
        items[-1].timings.total_s - items[-1].timings.time_to_first_token_s  # type: ignore[attr-defined]
        for i, items in enumerate(results)
        if i != waited
    ]
    assert queued[waited] >= min(decoding) > 0
    for items in results:
        assert items[0].queue_s <= items[-1].timings.total_s  # type: ignore[attr-defined]


async def test_times_are_measured_to_the_microsecond(engine: Engine) -> None:
    items = await collect(engine.add_request(request("us", max_tokens=5)))
    started, finished = items[0], items[-1]
    assert isinstance(started, Started) and isinstance(finished, Finished)
    timings = finished.timings
    seconds = [started.queue_s, timings.queue_s, timings.time_to_first_token_s, timings.total_s]
    assert all(s == round(s, 6) for s in seconds), seconds
    assert timings.total_s > 0 and timings.decode_tokens_per_second == round(
        timings.decode_tokens_per_second, 3
    )


async def test_messages_count_in_the_singular() -> None:
    runner = FakeRunner(max_batch_size=1, context_length=8)
    gate = ForwardGate()  # holds the model: "first" stays live while "second" is refused
    runner.on_forward = gate
    engine = Engine(runner, EngineConfig(max_batch_size=1, max_live_requests=1))
    engine.start()
    try:
        with pytest.raises(RequestError) as caught:
            engine.add_request(request("one", (HELLO,), max_tokens=8))
        assert (
            caught.value.message
            == "prompt (1 token) plus max_tokens (8) exceeds the context length (8 tokens)"
        )
        runner.context_length = 1
        with pytest.raises(RequestError) as caught:
            engine.add_request(request("one", (HELLO,), max_tokens=None))
        assert caught.value.message == "the prompt has 1 token; the context holds 1 token"
        runner.context_length = 8
        engine.add_request(request("first", (HELLO,), max_tokens=1))
        with pytest.raises(RequestError) as caught:
            engine.add_request(request("second", (HELLO,), max_tokens=1))
        assert caught.value.message == "the server is at its limit of 1 live request"
    finally:
        gate.open()
        await engine.stop()
