"""decoder_step.c over every architecture it takes (decoder_step._KINDS: llama with and without biases,
Mistral, Qwen2's biases, Qwen3's q/k norms, Phi-3's fused projections and partial rotation, SmolLM3's
NoPE layers, Granite's multipliers, OLMo 2's norms after the sublayers, Gemma's scaled embeddings and
GELU, Gemma 2's soft-capped scores, Gemma 3's q/k norms and local and global rope bases), in one C
call, with the greedy tokens of transformers' own layers on the same blocks, alone and in a batch,
past the windows, over prompts prefilled in chunks; mixed block types as the GGUF files mix them; and
what it does not take refused to the torch path."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from tests.model.test_architectures import CASES, NEW_TOKENS, greedy, prompts, tiny
from tests.model.test_model_runner import idle, run
from tests.models import quantize_q4_1, quantize_q8_0, reference_greedy, runner_greedy, tokenizer
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.kernels import ops
from tokenwire.service.model.decoder_step import _matrix
from tokenwire.service.model.quantized import (
    BlockLinear,
    BlockWeight,
    Q4Matmul,
    Q8Matmul,
    Q8Weight,
    swap_in_block_linears,
)
from tokenwire.service.model.runner import ModelRunner
from tokenwire.service.model.types import PrefillChunk, SamplingParams

pytestmark = pytest.mark.skipif(
    not (ops.available() and "parallel" in ops.struct_fields("Decoder") and ops.grouped_blocks()),
    reason="a build of the kernels from before the fields of every architecture",
)
# every architecture's CASES (test_architectures.py checks the torch path on them all)
C_CASES = [
    "llama", "llama3-rope-biases", "mistral", "qwen2", "qwen3", "phi3", "phi3-longrope", "smollm3", "granite",
    "olmo2", "gemma", "gemma2", "gemma3", "starcoder2", "cohere",
]  # fmt: skip


def quantize_groups_of_16(weight: torch.Tensor) -> Q8Weight:
    """8-bit codes in groups of 16 inputs, as Q6_K's blocks are repacked (quantized.py)."""
    out, inp = weight.shape
    groups = weight.detach().float().reshape(out, inp // 16, 16)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-8) / 127
    codes = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return Q8Weight(codes.reshape(out, inp), scale)


def on_blocks(model: Any, activations: str = "float32") -> Any:
    """The model's projections on blocks as a Q4_K_M file mixes them: q/k/v Q8_0, o and gate/up
    Q4_1, down in groups of 16 (Q6_K), the tied lm_head Q8_0."""
    weights: dict[str, BlockWeight] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            if name.endswith(("q_proj", "k_proj", "v_proj")):
                weights[name] = quantize_q8_0(module.weight)
            elif name.endswith("down_proj"):
                weights[name] = quantize_groups_of_16(module.weight)
            else:
                weights[name] = quantize_q4_1(module.weight)
    weights["lm_head"] = quantize_q8_0(model.lm_head.weight)
    assert swap_in_block_linears(model, weights, activations) == len(weights)
    return model


def tiny_on_blocks(name: str, *, activations: str = "float32", **overrides: Any) -> Any:
    """The architecture tests' tiny model (windows of 16 where it has them), its norm weights and
    biases random (Gemma's zero norms would not show a (1 + w) done wrong, and its greedy tokens
    would all be one; zero biases would not show a bias left out), on blocks."""
    model_type, settings = CASES[name]
    model = tiny(model_type, **(settings | overrides))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(".bias"):  # layer norms' too
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            elif "norm" in parameter_name:
                base = 0.0 if model_type.startswith("gemma") else 1.0  # Gemma's are added to 1
                parameter.copy_(base + torch.randn(parameter.shape, generator=generator) * 0.5)
    return on_blocks(model, activations)


def tiny_gemma3(*, softcap: bool = False, activations: str = "float32", **overrides: Any) -> Any:
    """The tiny Gemma 3 on blocks, without its final soft cap unless `softcap`."""
    cap = {} if softcap else {"final_logit_softcapping": None}
    return tiny_on_blocks("gemma3", activations=activations, **(cap | overrides))


def runner_over(model: Any) -> ModelRunner:
    return ModelRunner(copy.deepcopy(model), tokenizer(), name="test", source="memory", max_batch_size=8)


@pytest.mark.parametrize("name", [*C_CASES, "gemma3-softcap"])
async def test_the_c_step_gives_the_tokens_of_the_transformers_layers(name: str) -> None:
    """Greedy tokens as `generate` gives them over the same blocks: past the window, prompts in
    chunks of 16 tokens, alone and batched. With a final soft cap or a logit scale (Gemma 2,
    Granite, Command R) the lm_head runs in torch after the C step (the cap with it)."""
    softcap = name == "gemma3-softcap"
    if name.startswith("gemma3"):
        model = tiny_gemma3(softcap=softcap)
    else:  # with the architecture tests' weights these repeat one or two tokens
        lively = name in ("gemma", "granite", "llama3-rope-biases")
        model = tiny_on_blocks(name, **({"initializer_range": 0.2} if lively else {}))
    head_in_c = name not in ("gemma3-softcap", "gemma2", "granite", "cohere")
    reference = copy.deepcopy(model)
    if reference._supports_sdpa:  # faster; Gemma 2's soft cap needs the eager attention
        reference.set_attn_implementation("sdpa")
    expected = [reference_greedy(reference, p, NEW_TOKENS) for p in prompts()]
    assert len({tuple(tokens) for tokens in expected}) == len(expected)
    # Gemma 2's scores capped at 1 keep its tiny model to a few tokens whatever its weights (the
    # architecture tests check that the cap changes them)
    least = 1 if name == "gemma2" else 4
    assert all(len(set(tokens)) > least for tokens in expected), "a model saying one token would test less"
    runner = runner_over(model)
    assert runner.decode_kernel == "c" and runner._attention.native
    assert runner._decoder_step is not None and runner._decoder_step.lm_head_in_c == head_in_c
    engine = Engine(runner, EngineConfig(max_batch_size=8, prefill_tokens_per_step=16))
    engine.start()
    try:
        for i, prompt in enumerate(prompts()):
            ((tokens, _),) = await run(engine, [greedy(f"alone{i}", prompt)])
            assert tokens == expected[i], i
        batched = await run(engine, [greedy(f"b{i}", p) for i, p in enumerate(prompts())])
        assert [tokens for tokens, _ in batched] == expected
        assert await idle(engine)
    finally:
        await engine.stop()


@pytest.mark.parametrize("model_type", C_CASES)
@pytest.mark.parametrize(
    "activations",
    ["float32", pytest.param("int8", marks=pytest.mark.skipif(not ops.int8_activations(), reason="no VNNI"))],
)
def test_the_c_step_gives_the_tokens_and_logprobs_of_the_torch_path_on_mixed_blocks(
    model_type: str, activations: str
) -> None:
    """The C step against the runner's torch path over the same blocks (the cache is float16 in both
    with 8-bit activations), fed the same tokens: the same greedy tokens and logprobs within float
    noise (8-bit activations: the best token's logprob within their rounding). The llama's down
    projections are in groups of 16 too (Q6_K's: the C step took them as groups of 32 before)."""
    if model_type == "gemma3":
        model = tiny_gemma3(activations=activations)
    else:  # the architecture tests' configs: mistral and qwen3 past their windows
        model = tiny_on_blocks(model_type, activations=activations)
    fast, slow = runner_over(model), runner_over(model)
    assert fast.decode_kernel == "c"
    slow._decoder_step = None
    slow.decode_kernel = "torch"
    batch = prompts()
    traces: list[list[tuple[int, float | None]]] = [[], []]
    for runner in (fast, slow):
        for seq, _ in enumerate(batch):
            runner.add_sequence(seq, SamplingParams(), 0, logprobs=True)
    samples = [
        runner.prefill([PrefillChunk(s, p, True) for s, p in enumerate(batch)]) for runner in (fast, slow)
    ]
    for _ in range(30):
        for trace, step in zip(traces, samples, strict=True):
            trace.extend((step[s].token_id, step[s].logprob) for s in range(len(batch)))
        # Both fed the C step's tokens: 8-bit activations round a last-bit difference into a code one
        # off, which can flip this random model's near-ties (logprobs 0.015 apart)
        feed = {s: sample.token_id for s, sample in samples[0].items()}
        samples = [runner.decode(feed) for runner in (fast, slow)]
    if activations == "float32":
        assert [t for t, _ in traces[0]] == [t for t, _ in traces[1]]
    assert [lp for _, lp in traces[0]] == pytest.approx(
        [lp for _, lp in traces[1]], abs=5e-2 if activations == "int8" else 1e-4
    )


def test_gemma3_features_the_c_step_does_not_take_keep_the_torch_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An erf GELU, or a build of the kernels without Gemma's fields: the torch path, still exact."""
    erf = tiny_gemma3(hidden_activation="gelu")
    assert runner_over(erf).decode_kernel == "torch"
    monkeypatch.setattr(ops, "struct_fields", lambda ctype: frozenset())
    model = tiny_gemma3()
    runner = runner_over(model)
    assert runner.decode_kernel == "torch"
    prompt = prompts()[3]
    tokens = runner_greedy(runner, prompt, NEW_TOKENS)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    assert tokens == reference_greedy(reference, prompt, NEW_TOKENS)


@pytest.mark.parametrize(
    "activations",
    ["float32", pytest.param("int8", marks=pytest.mark.skipif(not ops.int8_activations(), reason="no VNNI"))],
)
@pytest.mark.parametrize("blocks", ["q4", "q8", "q8-groups-of-16-with-minimum"])
def test_the_c_embedding_lookup_gives_the_rows_the_blocks_dequantize_to(
    blocks: str, activations: str
) -> None:
    """decoder_step.c looks a tied embedding up on the lm_head's blocks (no float32 table): every row
    of every layout the kernels keep, bit for bit as quantized.py dequantizes it."""
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(5))
    if blocks == "q4":
        block: BlockWeight = quantize_q4_1(weight)
    elif blocks == "q8":
        block = quantize_q8_0(weight)
    else:
        grouped = quantize_groups_of_16(weight)
        block = Q8Weight(grouped.codes, grouped.scale, torch.randn(grouped.scale.shape) * 0.01)
    layer = BlockLinear(block, activations)
    assert isinstance(layer.matmul, Q4Matmul | Q8Matmul)
    ids = torch.tensor([0, 1, 15, 16, 17, 50, 95, 3])
    rows = torch.empty(len(ids), 64)
    ops.matrix_rows(ops.new("Matrix *", _matrix(layer.matmul)), ids, rows)
    assert torch.equal(rows, block.dequantize()[ids])
