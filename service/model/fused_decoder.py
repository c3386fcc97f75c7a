"""The torch path's decode step for llama-architecture models: the transformers layers' ops, with
q/k/v and gate/up each in one matmul (see runner.py's docstring for the measurements)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

from tokenwire.service.model.attention import SlotAttention
from tokenwire.service.model.quantized import BlockLinear, fuse_blocks


class FusedDecoder:
    """A llama decoder forward for one new token per row, with q/k/v and gate/up each one matmul.

    Gives the same bits as transformers' LlamaModel/LlamaDecoderLayer: the same elementwise ops
    (torch's rms_norm for LlamaRMSNorm, q and k rotated together), and matmuls that round the same
    fused or not (Q4_1) or stay within float32 noise (dense, transposed); see the module docstring.
    """

    def __init__(self, backbone: Any, layers: list[_FusedLayer], *, single_row: bool) -> None:
        self.backbone = backbone
        self.layers = layers
        # Also worth it for one row: true for Q4_1 layers, whose kernel gives the same bits fused or
        # not; dense float32 gemv is faster on nn.Linear's own layout, and bit-for-bit `generate`.
        self.single_row = single_row

    @classmethod
    def build(cls, backbone: Any) -> FusedDecoder | None:
        """None unless the model is a plain llama (no projection biases, SiLU MLP) on CPU (the
        layout win was measured on MKL only)."""
        config = backbone.config
        if (
            backbone.device.type != "cpu"
            or getattr(config, "model_type", None) != "llama"
            or getattr(config, "attention_bias", False)
            or getattr(config, "mlp_bias", False)
            or getattr(config, "hidden_act", None) != "silu"
            or not all(isinstance(layer.input_layernorm, LlamaRMSNorm) for layer in backbone.layers)
        ):
            return None
        layers = []
        all_blocks = True
        with torch.no_grad():
            for layer in backbone.layers:
                attn, mlp = layer.self_attn, layer.mlp
                q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
                gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
                all_blocks = all_blocks and all(
                    isinstance(p, BlockLinear) for p in (q, k, v, o, gate, up, down)
                )
                layers.append(
                    _FusedLayer(
                        layer=layer,
                        qkv=_fuse([q, k, v]),
                        o=_fuse([o]),
                        gate_up=_fuse([gate, up]),
                        down=_fuse([down]),
                        splits=(q.out_features, k.out_features, v.out_features),
                        intermediate=gate.out_features,
                    )
                )
        return cls(backbone, layers, single_row=all_blocks)

    def __call__(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, attention: SlotAttention
    ) -> torch.Tensor:
        backbone = self.backbone
        x = backbone.embed_tokens(ids)  # [n, 1, hidden]
        n = x.shape[0]
        cos, sin = backbone.rotary_emb(x, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # as apply_rotary_pos_emb does, once a step
        for fused in self.layers:
            layer = fused.layer
            attn = layer.self_attn
            head_dim = attn.head_dim
            q_width, k_width, _ = fused.splits
            qkv = fused.qkv(_rms_norm(layer.input_layernorm, x))
            # q and k rotated in one go: the same elementwise ops as apply_rotary_pos_emb, half the calls.
            qk = qkv[..., : q_width + k_width].view(n, 1, -1, head_dim).transpose(1, 2)
            qk = (qk * cos) + (rotate_half(qk) * sin)
            heads = q_width // head_dim
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[..., q_width + k_width :].view(n, 1, -1, head_dim).transpose(1, 2)
            out, _ = attention(attn, q, k, v, mask, scaling=attn.scaling)
            x = x + fused.o(out.reshape(n, 1, -1))
            gate, up = fused.gate_up(_rms_norm(layer.post_attention_layernorm, x)).split(
                fused.intermediate, dim=-1
            )
            x = x + fused.down(F.silu(gate) * up)
        return _rms_norm(backbone.norm, x)


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """A LlamaRMSNorm's forward as one call: torch's rms_norm gives the same bits, ~8 us sooner."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _FusedLayer:
    layer: Any  # the transformers decoder layer (norms, attention module for scaling/layer_idx)
    qkv: Projection  # hidden -> q + k + v
    o: Projection  # heads * head_dim -> hidden
    gate_up: Projection  # hidden -> 2 * intermediate
    down: Projection  # intermediate -> hidden
    splits: tuple[int, int, int]
    intermediate: int


def _fuse(linears: list[Any]) -> Projection:
    """One matmul for several bias-free projections of the same input, outputs side by side."""
    if not any(isinstance(p, BlockLinear) for p in linears):
        weight = torch.cat([p.weight for p in linears]).t().contiguous()  # [in, out]: see module docstring
        return lambda x: torch.matmul(x, weight)
    fused = fuse_blocks(linears)
    if fused is not None:
        return fused
    return lambda x: torch.cat([p(x) for p in linears], dim=-1)  # mixed formats: one matmul each
