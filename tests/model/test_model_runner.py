"""The real model runner behind the engine: greedy equals `generate`, seeds hold in a batch, rows free."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable

import pytest
import torch

from tests.models import (
    default_model,
    reference_greedy,
    rounded_activations,
    runner_and_reference,
    tiny_model,
    tiny_q4_model,
    tokenizer,
)
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import (
    Delta,
    Finished,
    GenerationRequest,
    PromptInput,
    SamplingParams,
    StoppingParams,
    StopReason,
)
from tokenwire.service.kernels import ops
from tokenwire.service.model.quantized import BlockLinear, _Released
from tokenwire.service.model.runner import ModelRunner
from tokenwire.service.model.types import PrefillChunk, TokenSample

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "Water boils at",
    "My favourite colour is",
    "The quick brown fox",
    "In 1492, Columbus",
]


def ids(text: str) -> list[int]:
    return list(tokenizer()(text)["input_ids"])


async def run(engine: Engine, requests: list[GenerationRequest]) -> list[tuple[list[int], Finished]]:
    async def one(request: GenerationRequest) -> tuple[list[int], Finished]:
        tokens: list[int] = []
        finished = None
        async for item in engine.add_request(request):
            if isinstance(item, Delta):
                tokens.extend(item.token_ids)
            elif isinstance(item, Finished):
                finished = item
        assert finished is not None
        return tokens, finished

    return list(await asyncio.gather(*(one(r) for r in requests)))


def greedy(request_id: str, prompt: str, n: int) -> GenerationRequest:
    return GenerationRequest(
        request_id, PromptInput(token_ids=tuple(ids(prompt))), stopping=StoppingParams(max_tokens=n)
    )


async def idle(engine: Engine) -> bool:
    for _ in range(100):
        if engine.is_idle():
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.fixture(params=["dense", "q4", "q4-float32"])
async def tiny(request):
    """The engine over the tiny llama, its projections dense or as Q4_1 blocks (on the default
    activations, or float32 ones); `generate` runs the same."""
    if request.param == "dense":
        model = tiny_model()
    else:
        model = tiny_q4_model(activations="float32" if request.param == "q4-float32" else "auto")
    runner, reference = runner_and_reference(model)
    # A 16-token prefill budget, so prompts are also prefilled in chunks across steps. Where the
    # transformers layers prefill rounded activations (torch's int4 kernel), whole prompts, as
    # `generate` does: there a chunk's attention rounds differently in the last bit, and the
    # rounding carries that into other tokens of this random model's near-ties. decoder_step.c
    # gives a token the same bits however its prompt is chunked.
    budget = 256 if runner.decode_kernel != "c" and rounded_activations(model) else 16
    # What these tests cover: with the C kernels, a Q4_1 model prefills and decodes in decoder_step.c.
    assert runner.decode_kernel == ("c" if request.param != "dense" else "torch")
    engine = Engine(runner, EngineConfig(max_batch_size=8, prefill_tokens_per_step=budget))
    engine.start()
    yield engine, reference
    await engine.stop()


async def test_tiny_greedy_matches_generate_alone_and_batched(tiny) -> None:
    engine, reference = tiny
    expected = [reference_greedy(reference, ids(p), 24) for p in PROMPTS]
    ((alone, _),) = await run(engine, [greedy("alone", PROMPTS[0], 24)])
    assert alone == expected[0]
    # Prompts longer than the 16-token prefill budget are prefilled in chunks across steps.
    batched = await run(engine, [greedy(f"b{i}", p, 24) for i, p in enumerate(PROMPTS)])
    assert [tokens for tokens, _ in batched] == expected
    assert await idle(engine)


async def test_tiny_repetition_penalty_matches_generate_in_a_batch(tiny) -> None:
    import torch

    engine, reference = tiny
    prompt = ids(PROMPTS[3])
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.5, pad_token_id=2
        )
    expected = [t for t in out[0, len(prompt) :].tolist() if t != 2]
    penalised = GenerationRequest(
        "pen",
        PromptInput(token_ids=tuple(prompt)),
        sampling=SamplingParams(repetition_penalty=1.5),
        stopping=StoppingParams(max_tokens=16),
    )
    # Others finish at different times, so rows move while the penalised request decodes.
    others = [greedy(f"o{i}", p, 4 + 3 * i) for i, p in enumerate(PROMPTS[:5])]
    results = await run(engine, [*others, penalised])
    assert results[-1][0] == expected


async def seeded_alone_and_in_a_batch(
    engine: Engine,
    sampling: SamplingParams,
    prompt: str,
    max_tokens: int,
    *,
    others_temperature: float,
    others_max_tokens: Callable[[int], int],
) -> tuple[list[int], list[int]]:
    """A seeded request's tokens run alone, then beside six others (every other one greedy)."""

    def seeded(request_id: str) -> GenerationRequest:
        return GenerationRequest(
            request_id,
            PromptInput(token_ids=tuple(ids(prompt))),
            sampling=sampling,
            stopping=StoppingParams(max_tokens=max_tokens, ignore_eos=True),
        )

    ((alone, _),) = await run(engine, [seeded("alone")])
    others = [
        GenerationRequest(
            f"o{i}",
            PromptInput(token_ids=tuple(ids(p))),
            sampling=SamplingParams(temperature=others_temperature, seed=i) if i % 2 else SamplingParams(),
            stopping=StoppingParams(max_tokens=others_max_tokens(i), ignore_eos=True),
        )
        for i, p in enumerate(PROMPTS[:6])
    ]
    results = await run(engine, [*others, seeded("in-batch")])
    return alone, results[-1][0]


async def test_tiny_seeded_sampling_same_alone_and_in_a_batch(tiny) -> None:
    engine, _ = tiny
    sampling = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone, in_batch = await seeded_alone_and_in_a_batch(
        engine, sampling, PROMPTS[2], 20, others_temperature=1.2, others_max_tokens=lambda i: 20
    )
    assert in_batch == alone, in_batch
    assert len(alone) == 20


async def test_tiny_abort_in_every_phase_frees_rows(tiny) -> None:
    engine, _ = tiny
    long_prompt = tuple(ids(" ".join(PROMPTS * 6)))
    streams = [
        engine.add_request(
            GenerationRequest(
                f"a{i}",
                PromptInput(token_ids=long_prompt if i == 0 else tuple(ids(PROMPTS[i % 8]))),
                stopping=StoppingParams(max_tokens=150, ignore_eos=True),
            )
        )
        for i in range(12)  # 8 rows: 4 wait
    ]
    # Abort as soon as a request decodes (a fixed sleep let these fast steps reach max_tokens first):
    # then one prompt is still prefilling in chunks, others decode, and 4 wait for a row.
    async for item in streams[1]:
        if isinstance(item, Delta):
            break
    for s in streams:
        engine.abort(s.request_id, StopReason.INTERRUPTED)
    for s in streams:
        items = [item async for item in s]
        assert isinstance(items[-1], Finished) and items[-1].reason is StopReason.INTERRUPTED
    assert await idle(engine)
    runner = engine.runner
    assert runner.free_rows == runner.max_batch_size and runner.live_sequences == 0


@pytest.mark.parametrize(
    "make_model",
    [tiny_model, tiny_q4_model, lambda: tiny_q4_model(activations="float32")],
    ids=["dense", "q4", "q4-float32"],
)
def test_tiny_fused_decode_matches_the_transformers_layers(make_model) -> None:
    """Prefill and decode run decoder_step.c (decode: or `_FusedDecoder`); the transformers layers
    give the same tokens."""
    model = make_model()
    fused, _ = runner_and_reference(model)
    plain, _ = runner_and_reference(copy.deepcopy(model))
    # The tiny llama qualifies, so the batched tests above use them.
    assert fused._decoder_step is not None or fused._fused is not None
    plain._decoder_step = plain._fused = None
    prompts = [ids(p) for p in PROMPTS[:5]]
    logprobs: dict[str, list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    for name, runner in (("fused", fused), ("plain", plain)):
        for i in range(len(prompts)):
            runner.add_sequence(i, SamplingParams(), 0, logprobs=True)
        samples = runner.prefill([PrefillChunk(i, p, last=True) for i, p in enumerate(prompts)])
        out = [[samples[i].token_id] for i in range(len(prompts))]
        lps = []
        for _ in range(12):
            samples = runner.decode({i: seq[-1] for i, seq in enumerate(out)})
            for i, seq in enumerate(out):
                seq.append(samples[i].token_id)
                lps.append(samples[i].logprob)
        tokens[name], logprobs[name] = out, lps
    assert tokens["fused"] == tokens["plain"]
    assert logprobs["fused"] == pytest.approx(logprobs["plain"], abs=1e-4)


@pytest.mark.parametrize("setup", ["no C kernels", "float16 model", "head_dim 24"])
def test_models_the_c_step_does_not_take_run_on_torch_ops(
    setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Q4_1 models that decoder_step.c (and its float16 cache) cannot serve still prefill and decode."""
    if setup == "no C kernels":
        monkeypatch.setattr(ops, "_load", lambda: None)
        model = tiny_q4_model()
    elif setup == "float16 model":  # the C kernels read float32 activations
        model = tiny_q4_model().to(torch.float16)
    else:  # decode_attention.c takes multiples of 16
        model = tiny_q4_model(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    runner, _ = runner_and_reference(model)
    assert runner.decode_kernel == "torch"
    assert runner.cache_dtype == runner.dtype
    runner.add_sequence(0, SamplingParams(), 0)
    samples = runner.prefill([PrefillChunk(0, ids(PROMPTS[0]), last=True)])
    tokens = [samples[0].token_id]
    for _ in range(4):
        tokens.append(runner.decode({0: tokens[-1]})[0].token_id)
    assert all(0 <= t < runner.vocab_size for t in tokens)


@pytest.mark.model
@pytest.mark.parametrize("activations", ["auto", "float32"])
def test_c_prefill_gives_the_same_bits_however_a_prompt_is_chunked_or_batched(activations: str) -> None:
    """decoder_step.c prefills each token as a row over its own sequence's cache: the first token's
    logprob and the next steps' are bit for bit the same for one whole chunk, one token a step,
    uneven chunks, or chunks sharing their steps with another prompt. (The transformers layers
    fail this on the default model: a chunk's SDPA rounds differently; the tiny one passes both.)"""
    model = default_model("auto", activations)
    prompt, other = ids(PROMPTS[2]), ids(PROMPTS[6])
    n = len(prompt)
    splits = {"whole": [n], "token by token": [1] * n, "uneven": [3, 5, n - 8], "batched": [4, n - 4]}
    results = {}
    for name, sizes in splits.items():
        runner, _ = runner_and_reference(model)
        assert runner.decode_kernel == "c"
        runner.add_sequence(0, SamplingParams(), 0, logprobs=True)
        if name == "batched":
            runner.add_sequence(1, SamplingParams(), 0)
        start, samples = 0, {}
        for i, size in enumerate(sizes):
            last = start + size == n
            chunks = [PrefillChunk(0, prompt[start : start + size], last)]
            if name == "batched":
                chunks.append(PrefillChunk(1, other[i * 4 : (i + 1) * 4], i == 1))
            samples = runner.prefill(chunks)
            start += size
        trace = [(samples[0].token_id, samples[0].logprob)]
        for _ in range(6):
            samples = runner.decode({seq: sample.token_id for seq, sample in samples.items()})
            trace.append((samples[0].token_id, samples[0].logprob))
        results[name] = trace
    assert len({tuple(trace) for trace in results.values()}) == 1, results


@pytest.mark.parametrize(
    "rope", [None, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}]
)  # fmt: skip
def test_the_c_step_takes_rotary_cos_sin_from_a_table_with_the_bits_torch_computes(
    rope: dict[str, object] | None,
) -> None:
    """decoder_step.c reads each position's cos/sin from a table computed once, where the model's rope
    does not change with the length; the tokens' logprobs are bit for bit those of cos/sin computed by
    torch for each step. A dynamic rope gets no table."""
    model = tiny_q4_model(activations="float32", **({"rope_scaling": rope} if rope else {}))
    traces = []
    for table in (True, False):
        runner, _ = runner_and_reference(model)
        step = runner._decoder_step
        assert step is not None
        assert step._rope_table == (rope is None or rope["rope_type"] != "dynamic")
        step._rope_table &= table
        for seq in (0, 1):
            runner.add_sequence(seq, SamplingParams(), 0, logprobs=True)
        samples = runner.prefill(
            [PrefillChunk(0, ids(PROMPTS[2]), True), PrefillChunk(1, ids(PROMPTS[4]), True)]
        )
        trace = []
        for _ in range(80):  # positions past the llama3 rope's original 64
            trace.append([(s.token_id, s.logprob) for s in samples.values()])
            samples = runner.decode({seq: sample.token_id for seq, sample in samples.items()})
        traces.append(trace)
    assert traces[0] == traces[1]


@pytest.mark.parametrize("model", ["dense", "q4"])
def test_a_saved_prefix_and_moved_rows_keep_their_keys(model: str) -> None:
    """A prefix saved and loaded at lengths that end inside a block of the C attention's key layout
    (16 positions), into another row, and rows moved as sequences end: the continuation is that of
    a sequence prefilled whole in place."""
    tiny = tiny_model() if model == "dense" else tiny_q4_model(activations="float32")
    prompt = ids(" ".join(PROMPTS))
    assert len(prompt) > 40

    def trace(runner: ModelRunner, seq: int, samples: dict[int, TokenSample], others: list[int]) -> list:
        out = []
        for step in range(12):
            out.append((samples[seq].token_id, samples[seq].logprob))
            if step == 3:  # the others end: the sequence's row moves down
                for other in others:
                    runner.remove_sequence(other)
                    samples.pop(other)
            samples = runner.decode({s: sample.token_id for s, sample in samples.items()})
        return out

    fresh, _ = runner_and_reference(tiny)
    fresh.add_sequence(0, SamplingParams(), 0, logprobs=True)
    expected = trace(fresh, 0, fresh.prefill([PrefillChunk(0, prompt, True)]), [])

    runner, _ = runner_and_reference(tiny)
    runner.add_sequence(0, SamplingParams(), 0)
    runner.prefill([PrefillChunk(0, prompt[:21], False)])
    prefix = runner.save_prefix(0, 21)
    for other in (1, 2):  # decoding in rows 0 and 1
        runner.add_sequence(other, SamplingParams(), 0)
    samples = runner.prefill([PrefillChunk(1, prompt[:5], True), PrefillChunk(2, prompt[3:9], True)])
    runner.remove_sequence(0)
    runner.add_sequence(3, SamplingParams(), 0, logprobs=True)
    runner.load_prefix(3, prefix, 19)
    samples |= runner.prefill([PrefillChunk(3, prompt[19:], True)])  # decoding in row 2
    got = trace(runner, 3, samples, [1, 2])
    if model == "q4":  # decoder_step.c: a token's bits do not depend on how its prompt was chunked
        assert got == expected
    else:  # torch's matmuls round a chunk of another size differently in the last bits
        assert [t for t, _ in got] == [t for t, _ in expected]
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in expected], abs=1e-4)


def test_the_c_step_refuses_token_ids_outside_its_embedding() -> None:
    runner, _ = runner_and_reference(tiny_q4_model())
    step = runner._decoder_step
    assert step is not None
    for bad in (-1, runner.vocab_size):
        with pytest.raises(ValueError, match="token ids"):
            step([5, bad], [0, 0])


def test_the_c_step_refuses_positions_and_slots_outside_its_cache() -> None:
    """decoder_step.c checks before it reads the rope table or writes the cache: an error, not a
    read or write past them (make sanitize runs this against the sanitized build)."""
    runner, _ = runner_and_reference(tiny_q4_model())
    step = runner._decoder_step
    assert step is not None
    max_len, max_rows = runner._attention.keys.shape[3], runner._attention.keys.shape[1]
    for positions, slots in [
        ([0, max_len], None),
        ([-1, 0], None),
        ([0, 1], [0, max_rows]),
        ([0, 1], [-1, 0]),
    ]:
        with pytest.raises(ops.KernelError, match="bad argument"):
            step([5, 6], positions, slots)
    assert step([5, 6], [0, 0]).shape[0] == 2  # and it still steps


@pytest.mark.model
def test_the_c_step_runs_the_lm_head_and_greedy_argmax_as_torch_and_sample_do() -> None:
    """Where the lm_head is on blocks, a decode step runs it in C, and for rows that only need the
    argmax takes that too: the same tokens (and, for rows asking, logprobs) as the lm_head layer
    and sampling.sample, in an all-greedy batch and beside a sampled row."""
    model = default_model("auto")
    traces = []
    for in_c in (True, False):
        runner, _ = runner_and_reference(model)
        step = runner._decoder_step
        assert step is not None and step.lm_head_in_c
        step.lm_head_in_c = in_c
        for seq, prompt in enumerate(PROMPTS[:3]):
            runner.add_sequence(seq, SamplingParams(), 0, prompt_token_ids=ids(prompt))
        samples = runner.prefill([PrefillChunk(seq, ids(p), True) for seq, p in enumerate(PROMPTS[:3])])
        trace = []
        for i in range(40):
            if i == 20:  # a sampled row and one asking for logprobs join
                runner.add_sequence(3, SamplingParams(temperature=0.9, seed=5), 5)
                runner.add_sequence(4, SamplingParams(), 0, logprobs=True)
                samples |= runner.prefill(
                    [PrefillChunk(3, ids(PROMPTS[4]), True), PrefillChunk(4, ids(PROMPTS[5]), True)]
                )
            trace.append(sorted((seq, s.token_id, s.logprob) for seq, s in samples.items()))
            samples = runner.decode({seq: s.token_id for seq, s in samples.items()})
        traces.append(trace)
    assert traces[0] == traces[1]


@pytest.mark.model
def test_a_loaded_runner_frees_the_layer_copies_decoder_step_holds_and_still_generates() -> None:
    loaded = ModelRunner.load("default", max_batch_size=2)
    layers = [m for m in loaded._backbone.layers.modules() if isinstance(m, BlockLinear)]
    assert len(layers) == 7 * loaded.model.config.num_hidden_layers
    if loaded.decode_kernel != "c":  # nothing holds them elsewhere: kept
        assert not any(isinstance(m.matmul, _Released) for m in layers)
        return
    assert all(isinstance(m.matmul, _Released) for m in layers)
    with pytest.raises(RuntimeError, match="released"):
        layers[0](torch.zeros(1, layers[0].in_features))
    shared, _ = runner_and_reference(default_model("auto"), max_batch_size=2)  # its layers intact
    tokens = {}
    for name, runner in (("loaded", loaded), ("shared", shared)):
        runner.add_sequence(0, SamplingParams(), 0)
        samples = runner.prefill([PrefillChunk(0, ids(PROMPTS[0]), last=True)])
        out = [samples[0].token_id]
        for _ in range(8):
            out.append(runner.decode({0: out[-1]})[0].token_id)
        tokens[name] = out
    assert tokens["loaded"] == tokens["shared"]


@pytest.mark.model
async def test_default_model_seeded_sampling_same_alone_and_in_a_batch() -> None:
    """As the server runs it (on its Q4_1 layers): a seed reproduces whatever else runs."""
    runner, _ = runner_and_reference(default_model("auto"), max_batch_size=8)
    engine = Engine(runner, EngineConfig(max_batch_size=8))
    engine.start()
    try:
        sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=77)
        alone, in_batch = await seeded_alone_and_in_a_batch(
            engine, sampling, PROMPTS[5], 128, others_temperature=1.0, others_max_tokens=lambda i: 20 + 25 * i
        )
        assert in_batch == alone and len(alone) == 128
    finally:
        await engine.stop()


@pytest.mark.model
@pytest.mark.parametrize("weights", ["dense", "auto"])
async def test_default_model_greedy_matches_generate_with_seven_others(weights: str) -> None:
    """Token for token, on float32 activations (dense layers, or the file's blocks)."""
    runner, reference = runner_and_reference(default_model(weights, "float32"), max_batch_size=8)
    engine = Engine(runner, EngineConfig(max_batch_size=8))
    engine.start()
    try:
        expected = reference_greedy(reference, ids(PROMPTS[2]), 32)
        ((alone, _),) = await run(engine, [greedy("alone", PROMPTS[2], 32)])
        assert alone == expected
        batched = await run(engine, [greedy(f"b{i}", p, 32) for i, p in enumerate(PROMPTS)])
        assert batched[2][0] == expected
        assert [t for t, _ in batched] == [reference_greedy(reference, ids(p), 32) for p in PROMPTS]
    finally:
        await engine.stop()


@pytest.mark.model
async def test_default_model_on_rounded_activations_is_batch_invariant_and_picks_the_models_argmax() -> None:
    """As the server runs by default (8-bit activations and a float16 cache where the CPU has them):
    a row's tokens are the same alone and with seven others; and each is what the model itself, run
    by plain transformers over the whole sequence, ranks first, or within a near-tie of it. Not
    token for token against `generate`: the engine's attention and norms differ from transformers'
    in the last bit, and rounding to 8 bits can turn that into another token at a near-tie, then a
    new text."""
    model = default_model("auto")
    runner, reference = runner_and_reference(model, max_batch_size=8)
    engine = Engine(runner, EngineConfig(max_batch_size=8))
    engine.start()
    try:
        ((alone, _),) = await run(engine, [greedy("alone", PROMPTS[2], 48)])
        batched = [
            tokens for tokens, _ in await run(engine, [greedy(f"b{i}", p, 48) for i, p in enumerate(PROMPTS)])
        ]
    finally:
        await engine.stop()
    assert batched[2] == alone
    gaps = []  # per token: how far below the reference's best logit the engine's choice is
    for prompt, tokens in zip(PROMPTS, batched, strict=True):
        prompt_ids = ids(prompt)
        with torch.inference_mode():
            logits = reference(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1]
        gaps.append(logits.max(dim=1).values - logits.gather(1, torch.tensor(tokens)[:, None])[:, 0])
    gap = torch.cat(gaps)
    # Here: 6 of 446 tokens are not the reference's first choice, at most 0.31 below it (float16
    # cache; 7 and 0.22 with a float32 one). A wrong position, key or row would put most tokens
    # several logits below.
    assert float((gap == 0).float().mean()) > 0.95 and float(gap.max()) < 1.0, gap.tolist()


async def test_a_failed_kernel_allocation_ends_the_steps_requests_and_the_engine_serves_on() -> None:
    """No abort() in the step: a kernel that cannot allocate fails the step, its requests end with an
    error, and the next request is served exactly."""
    runner, reference = runner_and_reference(tiny_q4_model())
    assert runner.decode_kernel == "c"
    engine = Engine(runner, EngineConfig(max_batch_size=8, prefill_tokens_per_step=256))
    engine.start()
    try:
        ops.fail_allocation(0)  # the step's first allocation: decoder_step.c's buffers
        ((tokens, failed),) = await run(engine, [greedy("fails", PROMPTS[0], 8)])
        assert failed.reason is StopReason.ERROR and tokens == []
        ops.fail_allocation(-1)
        expected = reference_greedy(reference, ids(PROMPTS[0]), 8)
        ((tokens, finished),) = await run(engine, [greedy("after", PROMPTS[0], 8)])
        assert finished.reason is StopReason.MAX_TOKENS and tokens == expected
        assert await idle(engine)
    finally:
        ops.fail_allocation(-1)
        await engine.stop()
