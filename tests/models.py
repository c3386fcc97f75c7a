"""Model fixtures for tests: a tiny random llama built in-process, and the real default model (cached)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tokenwire.service.model_loading import _cached_gguf_conversion, resolve_model
from tokenwire.service.model_runner import ModelRunner


@functools.cache
def default_model_folder() -> str:
    """The default model unpacked to safetensors (converted once per machine, then cached)."""
    return str(_cached_gguf_conversion(resolve_model("default")))


@functools.cache
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(default_model_folder())


def tiny_model(seed: int = 0) -> Any:
    """A 2-layer llama with the default model's vocabulary and random weights: fast and exact in float32."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def runner_and_reference(model: Any, max_batch_size: int = 8) -> tuple[ModelRunner, Any]:
    """A runner over `model`, and an untouched copy of it for plain `generate` as the reference."""
    reference = copy.deepcopy(model)
    runner = ModelRunner(model, tokenizer(), name="test", source="memory", max_batch_size=max_batch_size)
    return runner, reference


@functools.cache
def default_model() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_folder(), dtype=torch.float32).eval()


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
