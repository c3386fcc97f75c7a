"""Model fixtures for tests: a tiny random llama built in-process, and the real default model (cached)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import gguf
import torch
from transformers import AttentionInterface, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tokenwire.service.kernels import ops
from tokenwire.service.model.attention import decode_attention
from tokenwire.service.model.gguf_blocks import read_q4_1, read_q8_0
from tokenwire.service.model.loading import _cached_gguf_metadata, load_model, resolve_model
from tokenwire.service.model.quantized import (
    BlockLinear,
    BlockWeight,
    Q4Weight,
    Q8Weight,
    swap_in_block_linears,
)
from tokenwire.service.model.runner import ModelRunner
from tokenwire.service.model.types import PrefillChunk, SamplingParams


@functools.cache
def default_model_folder() -> str:
    """The default model's config and tokenizer (read from its file once per machine, then cached)."""
    return str(_cached_gguf_metadata(resolve_model("default")))


@functools.cache
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(default_model_folder())


def tiny_model(seed: int = 0, **config_overrides: Any) -> Any:
    """A 2-layer llama with the default model's vocabulary and random weights: fast and exact in float32."""
    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer()),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "attn_implementation": "sdpa",
    }
    config = LlamaConfig(**(settings | config_overrides))
    return LlamaForCausalLM(config).eval()


def quantize_q4_1(weight: torch.Tensor) -> Q4Weight:
    """A float [out, in] weight as Q4_1 blocks, quantized by the gguf package (as llama.cpp does)."""
    data = gguf.quants.quantize(weight.detach().float().numpy(), gguf.GGMLQuantizationType.Q4_1)
    return read_q4_1(data, (weight.shape[0], weight.shape[1]))


def quantize_q8_0(weight: torch.Tensor) -> Q8Weight:
    data = gguf.quants.quantize(weight.detach().float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return read_q8_0(data, (weight.shape[0], weight.shape[1]))


def tiny_q4_model(seed: int = 0, activations: str = "auto", **config_overrides: Any) -> Any:
    """The tiny llama as the default GGUF model runs on CPU: every decoder projection stored as Q4_1
    blocks, the tied lm_head as Q8_0 (where the C kernel runs them), on `activations`."""
    model = tiny_model(seed, **config_overrides)
    weights: dict[str, BlockWeight] = {
        name: quantize_q4_1(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }
    weights["lm_head"] = quantize_q8_0(model.lm_head.weight)
    # the lm_head's Q8_0 blocks need the C kernels (tests turn them off to check torch's path)
    assert swap_in_block_linears(model, weights, activations) == 14 + ops.available()
    return model


def _decode_attention_reference(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> tuple[Any, None]:
    """transformers' SDPA attention, except one-token steps run the engine's decode_attention."""
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[no-any-return]
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask == 0  # additive float mask: 0 where attending
    out = decode_attention(query, key, value, mask, kwargs.get("scaling"))
    return out.transpose(1, 2), None


AttentionInterface.register("tokenwire_reference", _decode_attention_reference)


def runner_and_reference(model: Any, max_batch_size: int = 8) -> tuple[ModelRunner, Any]:
    """A runner over `model`, and an untouched copy of it for plain `generate` as the reference.

    Where block layers round their activations (to 8 bits in the C kernel, to bfloat16 in torch's
    int4 kernel), the reference's one-token steps use the engine's decode_attention instead of
    SDPA: the rounding turns the two attentions' last-bit differences into other tokens after a few
    dozen steps, and the comparison is about the engine's batching, not about those kernels.
    Float32 matmuls (dense, or the C kernel on float32) keep stock SDPA, whose differences stay
    below the noise.
    """
    reference = copy.deepcopy(model)
    # Set either way: a cached model already given to an earlier runner points at its slot attention.
    reference.set_attn_implementation("tokenwire_reference" if rounded_activations(model) else "sdpa")
    runner = ModelRunner(model, tokenizer(), name="test", source="memory", max_batch_size=max_batch_size)
    return runner, reference


def rounded_activations(model: Any) -> bool:
    """Whether some block layer rounds its inputs (to 8 bits, or to bfloat16 on torch's kernel)."""
    return any(isinstance(m, BlockLinear) and m.matmul.activations != "float32" for m in model.modules())


def default_model(weights: str = "dense", activations: str = "auto") -> Any:
    """The real default model in float32: "dense" unpacks every layer, "auto" runs it as the server
    does on CPU (its Q4_1 layers on their 4-bit blocks, multiplying `activations`). Loaded once each."""
    return _default_model(weights, "auto" if weights == "dense" else activations)  # dense: no choice


@functools.cache
def _default_model(weights: str, activations: str) -> Any:
    model, _ = load_model(resolve_model("default"), torch.device("cpu"), torch.float32, weights, activations)
    return model


def runner_greedy(runner: ModelRunner, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """A runner's greedy tokens for one prompt, alone (sequence 0, removed after): its prefill's
    token, then a decode step a token."""
    runner.add_sequence(0, SamplingParams(), 0)
    try:
        tokens = [runner.prefill([PrefillChunk(0, prompt_ids, True)])[0].token_id]
        while len(tokens) < max_new_tokens:
            tokens.append(runner.decode({0: tokens[-1]})[0].token_id)
    finally:
        runner.remove_sequence(0)
    return tokens


def reference_greedy(reference: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy generation, without the EOS it may end with."""
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=reference.config.eos_token_id,
        )
    tokens = list(out[0, len(prompt_ids) :].tolist())
    eos = reference.config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
