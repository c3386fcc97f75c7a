"""What transformers' GGUF config mapping leaves out of a llama.cpp file, put back or refused.

transformers reads a fixed set of metadata keys per architecture (its integrations/ggml.py) into the
config. llama.cpp's converter writes more that change what the model computes: Phi-3's sliding window,
how many dimensions of each head the rope turns, and its longrope factors (as tensors), and rope
scaling for any architecture. A config built without them runs the model silently wrong (llama.cpp
reads them), so each is applied where the config type takes it, and otherwise the file is refused
with UnsupportedModelError. (Llama 3's `rope_freqs` tensor is applied to the model at load:
gguf_loading.py.)
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from tokenwire.service.model.architectures import UnsupportedModelError
from tokenwire.service.model.gguf_loading import Header

# Gemma 2 27B and Gemma 3 27B (by their layer counts, as llama.cpp tells them apart) scale queries by
# 1 / sqrt(hidden / heads); the others by 1 / sqrt(head_dim). The file does not say which.
_QUERY_SCALE_BY_WIDTH = {"gemma2": 46, "gemma3_text": 62}

# model types whose config takes a linear or yarn rope scaling as one set of rope parameters (Gemma 3's
# linear scaling of its global layers is taken too)
_SCALED_ROPE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def complete_config(config: Any, header: Header, file: np.ndarray, where: str) -> Any:
    """`config` (from transformers' GGUF mapping) with what the file says beyond it; `where` names
    the file in refusals. The config is rebuilt through its class, which checks what it is given."""
    arch, model_type = header.architecture, str(config.model_type)

    def key(name: str) -> Any:
        return header.metadata.get(f"{arch}.{name}")

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{where}: its metadata gives {what}, which tokenwire cannot put in a {model_type} config "
            "(transformers' GGUF loading drops it); serve the model's transformers folder instead"
        )

    changes: dict[str, Any] = {}
    rope = dict(config.rope_parameters or {})
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dims = key("rope.dimension_count")
    if dims is not None and dims != head_dim:
        if model_type != "phi3":
            raise refuse(f"a rope over {dims} of each head's {head_dim} dimensions")
        rope["partial_rotary_factor"] = dims / head_dim
    window = key("attention.sliding_window")
    # Phi-3-mini-4k's 2047: transformers (and the model as trained) apply it; llama.cpp has turned
    # Phi-3's window off, so past 2047 tokens the two differ, and this follows transformers
    if window and model_type == "phi3" and config.sliding_window != window:
        changes["sliding_window"] = window
    if model_type == "gemma3_text" and not window:
        # newer llama.cpp runs every layer globally then; transformers would assume 4096-token windows
        raise refuse("no sliding window (every layer global)")
    # llama.cpp takes a factor without a type (older converters' rope.scale_linear) as linear
    factor = key("rope.scaling.factor") or key("rope.scale_linear")
    scaling = key("rope.scaling.type") or ("linear" if factor not in (None, 1.0) else None)
    attention_factor = key("rope.scaling.attn_factor")
    if scaling not in (None, "none"):
        if not isinstance(factor, int | float):
            raise refuse(f"a {scaling} rope scaling without a factor")
        if model_type == "gemma3_text" and scaling == "linear":  # Gemma 3 4B and up: the global layers'
            rope["full_attention"] = dict(rope["full_attention"]) | {
                "rope_type": "linear",
                "factor": float(factor),
            }
        elif scaling in ("linear", "yarn") and model_type in _SCALED_ROPE_TYPES:
            rope |= {"rope_type": scaling, "factor": float(factor)}
            if key("rope.scaling.original_context_length"):
                rope["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
        else:
            raise refuse(f"a {scaling} rope scaling")
    factors = {
        info.name: gguf.quants.dequantize(
            file[header.data_start + info.offset : header.data_start + info.offset + info.nbytes],
            gguf.GGMLQuantizationType(info.ggml_type),
        )
        .reshape(-1)
        .tolist()
        for info in header.tensors
        if info.name in ("rope_factors_long.weight", "rope_factors_short.weight")
    }
    if factors:
        original = key("rope.scaling.original_context_length")
        if model_type != "phi3" or len(factors) != 2 or not original:
            raise refuse("longrope factor tensors")
        rope |= {
            "rope_type": "longrope",
            "long_factor": factors["rope_factors_long.weight"],
            "short_factor": factors["rope_factors_short.weight"],
        }
        changes["original_max_position_embeddings"] = int(original)
        # llama.cpp's default when the key is absent is 1 (transformers' would be sqrt(1 + ...))
        rope["attention_factor"] = float(attention_factor) if attention_factor is not None else 1.0
        attention_factor = None  # taken
    if attention_factor not in (None, 1.0):  # llama.cpp scales every rope's cos and sin by it
        raise refuse(f"a rope attention factor of {attention_factor}")
    if model_type in ("gemma2", "gemma3_text"):
        changes |= _gemma_attention(config, key)
    if rope != dict(config.rope_parameters or {}):
        changes["rope_parameters"] = rope
    if not changes:
        return config
    return type(config)(**(config.to_dict() | changes))


def _gemma_attention(config: Any, key: Any) -> dict[str, Any]:
    """Gemma 2/3's query scaling (query_pre_attn_scalar) as llama.cpp computes it, and Gemma 2's soft
    caps from the file, where the config's defaults would differ."""
    the_27b = config.num_hidden_layers == _QUERY_SCALE_BY_WIDTH[str(config.model_type)]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    changes: dict[str, Any] = {}
    scalar = config.hidden_size // config.num_attention_heads if the_27b else head_dim
    if config.query_pre_attn_scalar != scalar:
        changes["query_pre_attn_scalar"] = scalar
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = key(name)
        if value is not None and getattr(config, name, None) != value:
            changes[name] = float(value)
    return changes
