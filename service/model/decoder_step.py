"""A whole decode step in one C call (decoder_step.c), for llama models whose layers all run on GGUF blocks.

Run from torch, a decode step is ~55 small ops a layer; for one row their dispatch took ~8 of the
step's ~15 ms here. decoder_step.c runs every layer in one call: the same matmul and attention
kernels, with RMSNorm, the rotary embedding, SiLU and the residual adds in C between them.

It also looks up the token embeddings, and the rotary cos/sin in a table torch computed once for
every position (models whose rope changes with the length, "dynamic" and "longrope", get theirs
from torch each call). So a step starts without a torch op: each releases the GIL, and in the
server the event loop's thread, woken by the previous step's tokens, took it there and ran first
while the step waited, its other threads idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tokenwire.service.kernels import ops
from tokenwire.service.model.quantized import BlockLinear, Q4Matmul, Q8Matmul, fuse_blocks


class DecoderStep:
    """Callable: (token ids, positions, slots) -> final-norm hidden states [n, hidden]; `decode`
    runs the lm_head too, where it is on blocks, and can take each row's argmax.

    Writes each row's new key/value into the cache at its position, as the attention function does.
    """

    def __init__(self, backbone: Any, decoder: Any, keep: list[Any], *, rope_table: bool) -> None:
        self.backbone = backbone
        self._decoder = decoder  # a `Decoder *` (kernels.h)
        self._keep = keep  # what the C structs point into: cache, fused matrices, the layers array
        self._rope_table = rope_table
        self._vocab = backbone.embed_tokens.weight.shape[0]
        self._hidden = decoder.hidden
        # A decode step's outputs, reused: allocating them would be a torch op before the step.
        self._rows_out = torch.empty(decoder.max_rows, decoder.hidden)
        self.lm_head_in_c = decoder.lm_head.out_features > 0
        self._logits_out = torch.empty(decoder.max_rows, decoder.lm_head.out_features)
        self._argmax_out = np.empty(decoder.max_rows, dtype=np.int64)

    @classmethod
    def build(
        cls, backbone: Any, lm_head: Any, keys: torch.Tensor, values: torch.Tensor, *, attention_in_c: bool
    ) -> DecoderStep | None:
        """None unless decode attention runs in C (`_SlotAttention.native`: the kernels are here, a
        float32 model on CPU, a head_dim they take) and the model is a plain llama (SiLU MLP,
        RMSNorm), every projection on native blocks, widths multiples of 16."""
        config = backbone.config
        if getattr(config, "model_type", None) != "llama":  # before reading llama's module names
            return None
        layers = list(backbone.layers)
        norms = [
            *(norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)),
            backbone.norm,
        ]
        projections = [
            p
            for layer in layers
            for p in (
                *_attention_projections(layer),
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
                layer.mlp.down_proj,
            )
        ]
        if (
            not attention_in_c
            or not keys.is_contiguous()
            or getattr(config, "hidden_act", None) != "silu"
            or not all(_native_blocks(p) for p in projections)
            or not all(isinstance(norm, LlamaRMSNorm) for norm in norms)
            or len({norm.variance_epsilon for norm in norms}) != 1  # the C step takes one
            or any(width % 16 for width in (config.hidden_size, config.intermediate_size))
        ):
            return None
        embedding = backbone.embed_tokens.weight.detach()
        if embedding.dtype != torch.float32 or not embedding.is_contiguous():
            return None
        keep: list[Any] = [keys, values, embedding]  # the C structs hold raw pointers into all of these
        rope = _rope_table(backbone, keys.shape[3])
        if rope is not None:
            keep.extend(rope)

        def matrix(linears: list[BlockLinear]) -> dict[str, Any]:
            matmul = fuse_blocks(linears)
            if matmul is None:
                raise _Unsupported
            keep.append(matmul)
            return _matrix(matmul)

        array = ops.new("Layer[]", len(layers))  # zeroed, owned by this cdata: kept below
        try:
            for struct, layer in zip(array, layers, strict=True):
                struct.input_norm = ops.pointer(layer.input_layernorm.weight)
                struct.post_attention_norm = ops.pointer(layer.post_attention_layernorm.weight)
                struct.qkv = matrix(list(_attention_projections(layer)[:3]))
                struct.o = matrix([layer.self_attn.o_proj])
                struct.gate_up = matrix([layer.mlp.gate_proj, layer.mlp.up_proj])
                struct.down = matrix([layer.mlp.down_proj])
        except _Unsupported:
            return None
        keep.append(array)
        if _native_blocks(lm_head):
            keep.append(lm_head.matmul)  # its own blocks, no copy: held here too
        attention = layers[0].self_attn
        decoder = ops.new(
            "Decoder *",
            {
                "layers": len(layers),
                "hidden": config.hidden_size,
                "heads": config.num_attention_heads,
                "kv_heads": keys.shape[2],
                "head_dim": keys.shape[-1],
                "intermediate": config.intermediate_size,
                "eps": layers[0].input_layernorm.variance_epsilon,
                "attention_scale": attention.scaling,
                "layer": array,
                "final_norm": ops.pointer(backbone.norm.weight),
                # out_features 0 where the lm_head is not on native blocks
                "lm_head": _matrix(lm_head.matmul) if _native_blocks(lm_head) else {},
                "embedding": ops.pointer(embedding),
                "rope_cos": ops.pointer(None if rope is None else rope[0]),
                "rope_sin": ops.pointer(None if rope is None else rope[1]),
                "cache_k": ops.pointer(keys),
                "cache_v": ops.pointer(values),
                "half_cache": int(keys.dtype == torch.float16),
                "max_rows": keys.shape[1],
                "max_len": keys.shape[3],
            },
        )
        return cls(backbone, decoder, keep, rope_table=rope is not None)

    def __call__(
        self, ids: Sequence[int], positions: Sequence[int], slots: Sequence[int] | None = None
    ) -> torch.Tensor:
        """ids and positions per row; slots: each row's cache row, for a prefill of several tokens
        per sequence (by default row i is cache row i: a decode step). The result of a decode step
        is overwritten by the next one."""
        n = len(ids)
        x = self._rows_out if slots is None and n <= len(self._rows_out) else torch.empty(n, self._hidden)
        self._run(ids, positions, slots, x, None, None)
        return x[:n]

    def decode(
        self, ids: Sequence[int], positions: Sequence[int], *, argmax: bool
    ) -> tuple[torch.Tensor, list[int] | None]:
        """A decode step through the lm_head (`lm_head_in_c`): the logits [n, vocab], overwritten by
        the next step, and with `argmax` each row's, as `sampling.sample` takes it for greedy rows."""
        assert self.lm_head_in_c, "the lm_head does not run on blocks here"
        n = len(ids)
        self._run(
            ids, positions, None, self._rows_out, self._logits_out, self._argmax_out if argmax else None
        )
        return self._logits_out[:n], self._argmax_out[:n].tolist() if argmax else None

    def _run(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int] | None,
        x: torch.Tensor,
        logits: torch.Tensor | None,
        argmax: np.ndarray | None,
    ) -> None:
        n = len(ids)
        if n and not (min(ids) >= 0 and max(ids) < self._vocab):
            raise ValueError(f"token ids must be in [0, {self._vocab})")
        # numpy, not torch: creating these releases no GIL (see the module's docstring)
        ids_array = np.asarray(ids, dtype=np.int64)
        positions_array = np.asarray(positions, dtype=np.int64)
        slots_array = None if slots is None else np.asarray(slots, dtype=np.int64)
        cos = sin = None
        if not self._rope_table:
            at = torch.from_numpy(positions_array)[None]
            cos, sin = (
                t.reshape(n, -1).contiguous() for t in self.backbone.rotary_emb(x[:n], position_ids=at)
            )
        ops.decoder_step(self._decoder, ids_array, x, cos, sin, positions_array, slots_array, logits, argmax)


def _native_blocks(linear: Any) -> bool:
    return (
        isinstance(linear, BlockLinear)
        and isinstance(linear.matmul, Q4Matmul | Q8Matmul)
        and linear.matmul.kernel == "native"
    )


def _matrix(matmul: Q4Matmul | Q8Matmul) -> dict[str, Any]:
    """kernels.h's Matrix for a layer's blocks (the C struct points into them: keep them alive)."""
    q4 = isinstance(matmul, Q4Matmul)
    return {
        "bits": 4 if q4 else 8,
        "int8_activations": int(matmul.activations == "int8"),
        "out_features": matmul.out_features,
        "in_features": matmul.in_features,
        "codes": ops.pointer(matmul.codes),
        "scale": ops.pointer(matmul.scale),
        "minimum": ops.pointer(matmul.minimum if isinstance(matmul, Q4Matmul) else None),
    }


def _rope_table(backbone: Any, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rotary cos and sin [length, head_dim] of every position, as the model computes them;
    None where its rope changes with the sequence's length."""
    rotary = backbone.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return None
    dummy = torch.empty(1, dtype=torch.float32)
    cos, sin = rotary(dummy, position_ids=torch.arange(length)[None])
    return cos[0].contiguous(), sin[0].contiguous()


class _Unsupported(Exception):
    pass


def _attention_projections(layer: Any) -> tuple[Any, ...]:
    attention = layer.self_attn
    return (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
