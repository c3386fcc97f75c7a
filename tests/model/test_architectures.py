"""Every architecture the runner accepts is exact: its greedy tokens are transformers `generate`'s, past
sliding windows, over prompts prefilled in several chunks, alone and in a batch of different lengths;
and what it cannot run exactly is refused at load, with a message that lists what it can."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.model.test_model_runner import PROMPTS, idle, run, seeded_alone_and_in_a_batch
from tests.models import reference_greedy, runner_greedy, tokenizer
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import GenerationRequest, PromptInput, SamplingParams, StoppingParams
from tokenwire.service.kernels import ops
from tokenwire.service.model.architectures import ARCHITECTURES, UnsupportedModelError, model_features
from tokenwire.service.model.attention import SlotAttention
from tokenwire.service.model.runner import ModelRunner
from tokenwire.service.model.types import PrefillChunk

WINDOW = 16  # prompts of up to 75 tokens and 40 new ones run far past it
NEW_TOKENS = 40
PROMPT_LENGTHS = (7, 30, 52, 75)  # prefilled 16 tokens a step: up to five chunks each

# name -> (model_type, config overrides): every supported architecture, with the features it brings.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    # biases on every projection, llama3 rope scaling (positions past its original 64)
    "llama3-rope-biases": (
        "llama",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 64,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        },
    ),
    # every layer windowed; linear rope scaling
    "mistral": (
        "mistral",
        {"sliding_window": WINDOW, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    # q/k/v biases; layers 1.. windowed, layer 0 not
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    # q/k norms, windowed layers, yarn rope
    "qwen3": (
        "qwen3",
        {
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 2,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        },
    ),
    # embedding scaling, (1 + w) norms, GELU
    "gemma": ("gemma", {}),
    # alternating windows, attention and final logit soft caps small enough to bend these scores
    "gemma2": (
        "gemma2",
        {
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 1.0,
            "final_logit_softcapping": 2.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    # alternating windows, q/k norms, local and global rope bases, sandwich norms, final soft cap
    "gemma3": (
        "gemma3_text",
        {
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 2.0,
        },
    ),
    # fused qkv and gate_up projections, windowed, half the head rotated
    "phi3": ("phi3", {"sliding_window": WINDOW, "partial_rotary_factor": 0.5}),
    # longrope: exact up to original_max_position_embeddings, where the context is capped
    "phi3-longrope": (
        "phi3",
        {
            "original_max_position_embeddings": 128,
            "rope_scaling": {"rope_type": "longrope", "short_factor": [1.5] * 8, "long_factor": [3.0] * 8},
        },
    ),
    # layers without rope (no_rope_layers), windowed layers
    "smollm3": (
        "smollm3",
        {
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "no_rope_layers": [1, 0, 1, 0],
        },
    ),
    # layer norms with biases, GELU, every layer windowed
    "starcoder2": ("starcoder2", {"sliding_window": WINDOW}),
    # norms after attention and MLP, q/k norms over all heads
    "olmo2": ("olmo2", {}),
    # embedding, residual and attention multipliers; logits divided after the lm_head
    "granite": (
        "granite",
        {
            "embedding_multiplier": 4.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.5,
            "logits_scaling": 4.0,
        },
    ),
    # parallel attention and MLP, layer norms, q/k norms, logits scaled after the lm_head
    "cohere": ("cohere", {"use_qk_norm": True, "logit_scale": 0.5}),
}
# What each case's window or soft cap is, to check that it changes `generate`'s tokens (the tests
# would not see a runner that ignored it otherwise).
WITHOUT_FEATURE = {
    "mistral": {"sliding_window": 4096},
    "qwen2": {"sliding_window": 4096},
    "qwen3": {"sliding_window": 4096},
    "gemma2": {"sliding_window": 4096, "attn_logit_softcapping": None},
    "gemma3": {"sliding_window": 4096},
    "phi3": {"sliding_window": 4096},
    "smollm3": {"sliding_window": 4096},
    "starcoder2": {"sliding_window": 4096},
}


def tiny(model_type: str, **overrides: Any) -> Any:
    """A 4-layer model of this type with random weights (the same for the same overrides' shapes),
    in float32, with the default model's vocabulary; attention as transformers' eager code."""
    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer()),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "initializer_range": 0.1,  # larger than the default: scores the soft caps bend, fewer near-ties
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    config = AutoConfig.for_model(model_type, **(settings | overrides))
    config._attn_implementation = "eager"  # Gemma 2's soft cap: SDPA would drop it
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def prompts() -> list[list[int]]:
    rng = random.Random(16)
    return [[rng.randrange(3, 40000) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, Any, list[list[int]]]:
    """(name, model, `generate`'s tokens for each prompt), computed once per case."""
    model_type, overrides = CASES[request.param]
    model = tiny(model_type, **overrides)
    expected = [reference_greedy(model, p, NEW_TOKENS) for p in prompts()]
    return request.param, model, expected


def runner_over(model: Any, max_batch_size: int = 8) -> ModelRunner:
    """A runner over a copy of `model` (the runner sets its own attention on the model it runs)."""
    return ModelRunner(
        copy.deepcopy(model), tokenizer(), name="test", source="memory", max_batch_size=max_batch_size
    )


def greedy(request_id: str, prompt: list[int]) -> GenerationRequest:
    return GenerationRequest(
        request_id, PromptInput(token_ids=tuple(prompt)), stopping=StoppingParams(max_tokens=NEW_TOKENS)
    )


async def test_greedy_matches_generate_past_the_window_alone_and_in_a_batch(case) -> None:
    name, model, expected = case
    runner = runner_over(model)
    # The C attention serves every architecture's: windows, soft caps (Gemma 2's)
    assert runner._attention.native == ops.available()
    engine = Engine(runner, EngineConfig(max_batch_size=8, prefill_tokens_per_step=16))
    engine.start()
    try:
        for i, prompt in enumerate(prompts()):  # alone, each
            ((tokens, _),) = await run(engine, [greedy(f"alone{i}", prompt)])
            assert tokens == expected[i], (name, i)
        batched = await run(engine, [greedy(f"b{i}", p) for i, p in enumerate(prompts())])
        assert [tokens for tokens, _ in batched] == expected, name
        assert await idle(engine)
    finally:
        await engine.stop()
    assert all(len(tokens) == NEW_TOKENS for tokens in expected), "an early EOS would test less"


def test_first_token_logprobs_are_the_models_own(case) -> None:
    """The logprob of each prompt's first token is the model's (its final soft cap included)."""
    name, model, _ = case
    runner = runner_over(model)
    batch = prompts()
    for seq, _ in enumerate(batch):
        runner.add_sequence(seq, SamplingParams(), 0, logprobs=True)
    samples = runner.prefill([PrefillChunk(seq, p, True) for seq, p in enumerate(batch)])
    for seq, prompt in enumerate(batch):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        assert samples[seq].token_id == int(logprobs.argmax())
        assert samples[seq].logprob == pytest.approx(float(logprobs.max()), abs=1e-4), name


@pytest.mark.parametrize("name", list(WITHOUT_FEATURE))
def test_each_window_and_soft_cap_changes_what_generate_says(name: str) -> None:
    """Without it, the same weights give other tokens: the tests above see a runner that ignores it."""
    model_type, overrides = CASES[name]
    with_feature = tiny(model_type, **overrides)
    without = tiny(model_type, **(overrides | WITHOUT_FEATURE[name]))
    assert all(
        torch.equal(a, b) for a, b in zip(with_feature.parameters(), without.parameters(), strict=True)
    )
    batch = prompts()
    assert [reference_greedy(with_feature, p, NEW_TOKENS) for p in batch] != [
        reference_greedy(without, p, NEW_TOKENS) for p in batch
    ]


def test_every_supported_architecture_is_tested_here() -> None:
    assert {model_type for model_type, _ in CASES.values()} == set(ARCHITECTURES)


def test_soft_caps_a_model_type_does_not_read_are_not_applied() -> None:
    """A llama config carrying Gemma's fields: transformers' llama ignores them, and so does the runner."""
    features = model_features(
        AutoConfig.for_model("llama", attn_logit_softcapping=5.0, final_logit_softcapping=2.0)
    )
    assert features.attention_softcap is None and features.final_softcap is None


def test_longrope_caps_the_context_where_its_frequencies_would_switch() -> None:
    model_type, overrides = CASES["phi3-longrope"]
    runner = runner_over(tiny(model_type, **overrides))
    assert runner.context_length == 128


# ---- refusals ----


def _config(model_type: str, **overrides: Any) -> Any:
    return AutoConfig.for_model(model_type, **overrides)


def _with(config: Any, **attributes: Any) -> Any:
    for key, value in attributes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(
    ("config", "refused"),
    [
        (lambda: _config("gpt2"), "model type 'gpt2' is not supported"),
        (lambda: _config("mixtral"), "model type 'mixtral' is not supported"),
        (lambda: _config("gemma3"), "text-only form, model_type gemma3_text"),
        (lambda: _config("llama", rope_scaling={"rope_type": "mrope"}), "rope type 'mrope'"),
        (lambda: _with(_config("llama"), rope_parameters={"rope_type": "su-per"}), "rope type 'su-per'"),
        (
            lambda: _config("gemma3_text", use_bidirectional_attention=True),
            "bidirectional attention",
        ),
        (
            lambda: _with(_config("qwen2", num_hidden_layers=2), layer_types=["chunked_attention"] * 2),
            "layer types ['chunked_attention']",
        ),
        (lambda: _with(_config("mistral"), sliding_window=0), "sliding_window 0"),
    ],
    ids=["gpt2", "mixtral", "gemma3-multimodal", "rope-mrope", "rope-unknown", "bidirectional",
         "chunked-layers", "window-0"],
)  # fmt: skip
def test_what_cannot_run_exactly_is_refused_with_what_can(config, refused: str) -> None:
    try:
        made = config()
    except Exception as error:  # transformers itself rejects the config: that is a refusal too
        pytest.skip(f"transformers refuses this config itself: {error}")
    with pytest.raises(UnsupportedModelError) as raised:
        model_features(made)
    message = str(raised.value)
    assert refused in message
    assert (
        "supported model types: cohere (Command R), gemma (Gemma), gemma2 (Gemma 2), gemma3_text" in message
    )
    assert "phi3 (Phi-3), qwen2 (Qwen2, Qwen2.5), qwen3 (Qwen3), smollm3 (SmolLM3)" in message
    assert "rope types: default, linear, llama3, yarn" in message
    assert isinstance(raised.value, ValueError)


def test_a_folder_of_an_unsupported_model_is_refused_before_its_weights_load(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "num_hidden_layers": 2}))
    with pytest.raises(UnsupportedModelError, match="model type 'gpt_neox' is not supported; supported"):
        ModelRunner.load(str(tmp_path))


def test_a_runner_refuses_an_unsupported_model() -> None:
    config = _config("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer()), n_positions=64)
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        ModelRunner(AutoModelForCausalLM.from_config(config), tokenizer(), name="t", source="m")


def test_an_attention_call_asking_for_more_than_the_config_said_fails() -> None:
    """A layer whose module passes a window, soft cap or argument the config did not show (say a
    transformers version that adds one) stops the step instead of running without it."""
    keys = torch.zeros(2, 1, 2, 64, 16)
    attention = SlotAttention(keys, keys.clone(), torch.float32, windows=[None, 16])
    module = torch.nn.Module()
    q = torch.zeros(1, 4, 1, 16)
    kv = torch.zeros(1, 2, 1, 16)
    for layer, kwargs in [
        (0, {"sliding_window": 16}),
        (1, {}),
        (1, {"sliding_window": 16, "softcap": 30.0}),
        (1, {"sliding_window": 16, "s_aux": torch.zeros(4)}),
    ]:
        module.layer_idx = layer
        with pytest.raises(UnsupportedModelError, match=f"layer {layer}'s attention asks for"):
            attention(module, q, kv, kv, None, **kwargs)


async def test_seeded_sampling_over_windows_is_the_same_alone_and_in_a_batch() -> None:
    """A row's decode attention does not depend on the rows beside it, windowed layers included."""
    model_type, overrides = CASES["gemma3"]
    runner = runner_over(tiny(model_type, **overrides))
    engine = Engine(runner, EngineConfig(max_batch_size=8, prefill_tokens_per_step=16))
    engine.start()
    try:
        alone, in_batch = await seeded_alone_and_in_a_batch(
            engine,
            SamplingParams(temperature=0.9, top_k=50, seed=1234),
            PROMPTS[2],
            48,
            others_temperature=1.2,
            others_max_tokens=lambda i: 10 + 8 * i,
        )
    finally:
        await engine.stop()
    assert in_batch == alone and len(alone) == 48


@pytest.mark.parametrize("name", ["phi3", "gemma3"])
def test_a_saved_folder_loads_and_generates_as_transformers_does(name: str, tmp_path: Path) -> None:
    """As `--model FOLDER` loads it (a Phi-3 folder failed here on its fused qkv)."""
    model_type, overrides = CASES[name]
    model = tiny(model_type, **overrides)
    model.save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    runner = ModelRunner.load(str(tmp_path), max_batch_size=2)
    runner.warm_up()
    prompt = prompts()[3]
    tokens = runner_greedy(runner, prompt, NEW_TOKENS)
    assert tokens == reference_greedy(model, prompt, NEW_TOKENS)
