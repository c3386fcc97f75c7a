"""Which model architectures tokenwire runs exactly, and what the runner must add to run them.

The runner runs a model's own transformers modules: embeddings and their scaling, norms, q/k norms,
fused or separate projections and their biases, the rotary embedding of each rope variant. Only the
attention is its own (attention.py, over the slotted KV cache), and it calls the lm_head outside the
CausalLM forward. So what must be known here is what those two must reproduce: each layer's sliding
window, the attention logit soft cap, what the CausalLM forward does to the logits (a scale, a final
soft cap), and up to where each rope variant gives a row the frequencies of its own positions.
A model type not listed, or a config asking for anything else, is refused at load with
UnsupportedModelError, whose message lists what is supported: a model runs exactly or not at all.
Each entry is checked against transformers `generate` in tests/model/test_architectures.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn


class UnsupportedModelError(ValueError):
    """A model, or a feature of one, that tokenwire cannot run exactly: refused at load (never run
    approximately). The message names what was refused and lists what is supported."""


@dataclass(frozen=True)
class Architecture:
    label: str  # the families a user knows it by
    # Where a layer's sliding window comes from: "layer_types" (config.sliding_window for the
    # "sliding_attention" layers only: Qwen2/3, Gemma 2/3), "all" (config.sliding_window, when set,
    # for every layer: Mistral, Phi-3), "none" (no layer has one, whatever the config says).
    windows: str
    # What its CausalLM forward does to the logits after the lm_head: "" nothing, "multiply" by
    # config.logit_scale (Cohere), "divide" by config.logits_scaling (Granite).
    logits: str = ""
    # Whether its modules read config.attn_logit_softcapping (into attention) and its CausalLM
    # forward config.final_logit_softcapping (a config of another type may carry them, unread).
    attention_softcap: bool = False
    final_softcap: bool = False


# model_type -> what the runner knows about it. Add one only with its test against `generate`.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("Llama 2/3, SmolLM", "none"),
    "mistral": Architecture("Mistral", "all"),
    "qwen2": Architecture("Qwen2, Qwen2.5", "layer_types"),
    "qwen3": Architecture("Qwen3", "layer_types"),
    "gemma": Architecture("Gemma", "none"),
    "gemma2": Architecture("Gemma 2", "layer_types", attention_softcap=True, final_softcap=True),
    "gemma3_text": Architecture("Gemma 3, text only", "layer_types", final_softcap=True),
    "phi3": Architecture("Phi-3", "all"),
    "smollm3": Architecture("SmolLM3", "layer_types"),
    "starcoder2": Architecture("StarCoder2", "all"),
    "olmo2": Architecture("OLMo 2", "none"),
    "granite": Architecture("Granite 3", "none", logits="divide"),
    "cohere": Architecture("Command R", "none", logits="multiply"),
}

# Rope variants whose cos/sin depend on the position alone: transformers computes them, exactly.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Variants that switch frequencies on the longest position in the forward (over the whole batch, in
# transformers): exact per row only while no position passes the point where they switch, so the
# context is capped there. "dynamic" switches past max_position_embeddings (already the cap);
# "longrope" past original_max_position_embeddings.
LENGTH_ROPE_TYPES = ("dynamic", "longrope")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelFeatures:
    """What the runner adds around a supported model's modules (see the module docstring)."""

    model_type: str
    windows: tuple[int | None, ...]  # per layer: attend to the last `window` positions, itself included
    attention_softcap: float | None  # scores -> softcap * tanh(scores / softcap), before the mask
    final_softcap: float | None  # the same on the logits
    logit_scale: float | None  # logits *= logit_scale, before the soft cap
    logits_divisor: float | None  # logits /= logits_divisor, before the soft cap
    rope_context: int | None  # the longest context its rope stays exact for; None: any


def supported_text() -> str:
    """The supported architectures and rope types, for refusal messages."""
    models = ", ".join(f"{name} ({arch.label})" for name, arch in sorted(ARCHITECTURES.items()))
    ropes = ", ".join((*STATIC_ROPE_TYPES, *LENGTH_ROPE_TYPES))
    return f"supported model types: {models}; rope types: {ropes}"


def architecture(model_type: Any) -> Architecture:
    """The entry for a config's model_type; UnsupportedModelError, listing the supported, if none."""
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        hint = ""
        if model_type == "gemma3":
            hint = " (a multimodal Gemma 3 checkpoint: its text-only form, model_type gemma3_text, is)"
        raise UnsupportedModelError(f"model type {model_type!r} is not supported{hint}; {supported_text()}")
    return arch


def model_features(config: Any) -> ModelFeatures:
    """What a config asks of the runner; UnsupportedModelError for anything it cannot run exactly."""
    model_type = str(getattr(config, "model_type", ""))
    arch = architecture(model_type)
    refuse = _Refusal(model_type)
    layers = int(config.num_hidden_layers)
    if getattr(config, "use_bidirectional_attention", False):
        refuse("bidirectional attention (use_bidirectional_attention)")
    if getattr(config, "is_encoder_decoder", False):
        refuse("an encoder-decoder model")
    sliding = getattr(config, "sliding_window", None)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    if len(layer_types) < layers or not set(layer_types) <= set(_LAYER_TYPES):
        refuse(f"layer types {sorted(set(layer_types))} (supported: {', '.join(_LAYER_TYPES)})")
    # A llama config may carry a sliding_window its model ignores; Qwen2/3 and SmolLM3 ignore theirs
    # without use_sliding_window.
    if arch.windows == "none" or sliding is None or not getattr(config, "use_sliding_window", True):
        windows: tuple[int | None, ...] = (None,) * layers
    elif not isinstance(sliding, int) or sliding < 1:
        refuse(f"sliding_window {sliding!r}")
    elif arch.windows == "all":
        windows = (sliding,) * layers
    else:
        windows = tuple(sliding if t == "sliding_attention" else None for t in layer_types[:layers])
    rope_context = _rope_context(config, refuse)
    return ModelFeatures(
        model_type=model_type,
        windows=windows,
        attention_softcap=_softcap(config, "attn_logit_softcapping", refuse)
        if arch.attention_softcap
        else None,
        final_softcap=_softcap(config, "final_logit_softcapping", refuse) if arch.final_softcap else None,
        logit_scale=_positive(config, "logit_scale", refuse) if arch.logits == "multiply" else None,
        logits_divisor=_positive(config, "logits_scaling", refuse) if arch.logits == "divide" else None,
        rope_context=rope_context,
    )


class _Refusal:
    def __init__(self, model_type: str) -> None:
        self.model_type = model_type

    def __call__(self, what: str) -> NoReturn:
        raise UnsupportedModelError(
            f"{self.model_type} with {what} is not supported: tokenwire would not run it exactly; "
            f"{supported_text()}"
        )


def _positive(config: Any, name: str, refuse: _Refusal) -> float:
    value = getattr(config, name, None)
    if not isinstance(value, int | float) or value <= 0:
        refuse(f"{name} {value!r}")
    return float(value)


def _softcap(config: Any, name: str, refuse: _Refusal) -> float | None:
    value = getattr(config, name, None)
    if value is None:
        return None
    if not isinstance(value, int | float) or value <= 0:
        refuse(f"{name} {value!r}")
    return float(value)


def _rope_context(config: Any, refuse: _Refusal) -> int | None:
    """The longest context the config's rope stays exact for, per row (None: no limit of its own)."""
    parameters = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    if not isinstance(parameters, Mapping):
        refuse(f"rope parameters {parameters!r}")
    # One set for the model, or one per layer type (Gemma 3: local and global bases).
    sets = (
        list(parameters.values())
        if all(isinstance(v, Mapping) for v in parameters.values())
        else [parameters]
    )
    limit: int | None = None
    for rope in sets:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in STATIC_ROPE_TYPES or rope_type == "dynamic":
            continue  # dynamic: unchanged up to max_position_embeddings, the runner's own cap
        if rope_type == "longrope":
            original = rope.get("original_max_position_embeddings")
            if not isinstance(original, int):
                refuse("a longrope rope without original_max_position_embeddings")
            limit = original if limit is None else min(limit, original)
            continue
        refuse(f"rope type {rope_type!r}")
    return limit
