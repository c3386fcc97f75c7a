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

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tokenwire.service.kernels import native
from tokenwire.service.model.quantized import BlockLinear, Q4Matmul, Q8Matmul, fuse_blocks

_C_INT64 = ctypes.c_int64


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("bits", _C_INT64),
        ("int8_activations", _C_INT64),
        ("out_features", _C_INT64),
        ("in_features", _C_INT64),
        ("codes", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("minimum", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_attention_norm", ctypes.c_void_p),
        ("qkv", _Matrix),
        ("o", _Matrix),
        ("gate_up", _Matrix),
        ("down", _Matrix),
    ]


class _Decoder(ctypes.Structure):
    _fields_ = [
        ("layers", _C_INT64),
        ("hidden", _C_INT64),
        ("heads", _C_INT64),
        ("kv_heads", _C_INT64),
        ("head_dim", _C_INT64),
        ("intermediate", _C_INT64),
        ("eps", ctypes.c_float),
        ("attention_scale", ctypes.c_float),
        ("layer", ctypes.POINTER(_Layer)),
        ("final_norm", ctypes.c_void_p),
        ("lm_head", _Matrix),
        ("embedding", ctypes.c_void_p),
        ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p),
        ("cache_k", ctypes.c_void_p),
        ("cache_v", ctypes.c_void_p),
        ("half_cache", _C_INT64),
        ("max_rows", _C_INT64),
        ("max_len", _C_INT64),
    ]


class DecoderStep:
    """Callable: (token ids, positions, slots) -> final-norm hidden states [n, hidden]; `decode`
    runs the lm_head too, where it is on blocks, and can take each row's argmax.

    Writes each row's new key/value into the cache at its position, as the attention function does.
    """

    def __init__(self, backbone: Any, decoder: _Decoder, keep: list[Any], *, rope_table: bool) -> None:
        self.backbone = backbone
        self._decoder = decoder
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
            or getattr(config, "model_type", None) != "llama"
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

        def matrix(linears: list[BlockLinear]) -> _Matrix:
            matmul = fuse_blocks(linears)
            if matmul is None:
                raise _Unsupported
            keep.append(matmul)
            return _matrix(matmul)

        try:
            structs = [
                _Layer(
                    layer.input_layernorm.weight.data_ptr(),
                    layer.post_attention_layernorm.weight.data_ptr(),
                    matrix(list(_attention_projections(layer)[:3])),
                    matrix([layer.self_attn.o_proj]),
                    matrix([layer.mlp.gate_proj, layer.mlp.up_proj]),
                    matrix([layer.mlp.down_proj]),
                )
                for layer in layers
            ]
        except _Unsupported:
            return None
        array = (_Layer * len(structs))(*structs)
        keep.append(array)
        if _native_blocks(lm_head):
            keep.append(lm_head.matmul)  # its own blocks, no copy: held here too
        attention = layers[0].self_attn
        decoder = _Decoder(
            layers=len(layers),
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=keys.shape[2],
            head_dim=keys.shape[-1],
            intermediate=config.intermediate_size,
            eps=layers[0].input_layernorm.variance_epsilon,
            attention_scale=attention.scaling,
            layer=ctypes.cast(array, ctypes.POINTER(_Layer)),
            final_norm=backbone.norm.weight.data_ptr(),
            # out_features 0 where the lm_head is not on native blocks
            lm_head=_matrix(lm_head.matmul) if _native_blocks(lm_head) else _Matrix(),
            embedding=embedding.data_ptr(),
            rope_cos=None if rope is None else rope[0].data_ptr(),
            rope_sin=None if rope is None else rope[1].data_ptr(),
            cache_k=keys.data_ptr(),
            cache_v=values.data_ptr(),
            half_cache=int(keys.dtype == torch.float16),
            max_rows=keys.shape[1],
            max_len=keys.shape[3],
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
        step = native.library().decoder_step  # type: ignore[union-attr]
        step(
            ctypes.byref(self._decoder),
            ids_array.ctypes.data,
            x.data_ptr(),
            None if cos is None else cos.data_ptr(),
            None if sin is None else sin.data_ptr(),
            positions_array.ctypes.data,
            None if slots_array is None else slots_array.ctypes.data,
            n,
            None if logits is None else logits.data_ptr(),
            None if argmax is None else argmax.ctypes.data,
            native.threads(),
        )


def _native_blocks(linear: Any) -> bool:
    return (
        isinstance(linear, BlockLinear)
        and isinstance(linear.matmul, Q4Matmul | Q8Matmul)
        and linear.matmul.kernel == "native"
    )


def _matrix(matmul: Q4Matmul | Q8Matmul) -> _Matrix:
    int8 = int(matmul.activations == "int8")
    if isinstance(matmul, Q4Matmul):
        return _Matrix(4, int8, matmul.out_features, matmul.in_features, *_pointers(matmul, "minimum"))
    return _Matrix(8, int8, matmul.out_features, matmul.in_features, *_pointers(matmul))


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


def _pointers(matmul: Any, *extra: str) -> list[int]:
    return [t.data_ptr() for t in (matmul.codes, matmul.scale, *(getattr(matmul, name) for name in extra))]
