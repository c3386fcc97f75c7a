"""A whole decode step in one C call (decoder_step.c), for models of every accepted architecture
(`_KINDS`) whose layers all run on GGUF blocks.

Run from torch, a decode step is ~55 small ops a layer; for one row their dispatch took ~8 of the
step's ~15 ms here. decoder_step.c runs every layer in one call: the same matmul and attention
kernels, with RMSNorm, the rotary embedding, SiLU and the residual adds in C between them.

It also looks up the token embeddings (from a float32 table, or from the tied lm_head's blocks where
the embedding is on them: gguf_loading.BlockEmbedding), and the rotary cos/sin in a table torch
computed once for every position (models whose rope changes with the length, "dynamic" and
"longrope", get theirs from torch each call). So a step starts without a torch op: each releases
the GIL, and in the server the event loop's thread, woken by the previous step's tokens, took it
there and ran first while the step waited, its other threads idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.models.cohere.modeling_cohere import CohereLayerNorm
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.granite.modeling_granite import GraniteRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
from transformers.models.smollm3.modeling_smollm3 import SmolLM3RMSNorm

from tokenwire.service.kernels import ops
from tokenwire.service.model.architectures import model_features
from tokenwire.service.model.gguf_loading import BlockEmbedding
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
        self._vocab = backbone.embed_tokens.num_embeddings
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
        """None unless decode attention runs in C (`SlotAttention.native`: the kernels are here, a
        float32 model on CPU, a head_dim it takes), the model is one whose layers decoder_step.c
        computes (`_KINDS`) and this build of the kernels has the fields its layers need, every
        projection on native blocks, widths multiples of 16."""
        config = backbone.config
        kind = _KINDS.get(str(getattr(config, "model_type", "")))  # before reading its module names
        if kind is None or not attention_in_c or not keys.is_contiguous():
            return None
        fields = {name: ops.struct_fields(name) for name in ("Layer", "Decoder", "Matrix")}
        if not kind.needs <= fields["Layer"] | fields["Decoder"]:
            return None  # a build from before these fields: the model keeps the torch path
        layers = list(backbone.layers)
        features = model_features(config)
        norms = [
            *(norm for layer in layers for norm in kind.layer_norms(layer).values() if norm is not None),
            backbone.norm,
        ]
        projections = [p for layer in layers for group in kind.projections(layer) for p in group]
        if (
            not kind.accepts(config)
            or not all(_native_blocks(p) for p in projections)
            or not all(type(norm) is kind.norm_type for norm in norms)
            or len({_eps(norm) for norm in norms}) != 1  # the C step takes one
            or len({layer.self_attn.scaling for layer in layers}) != 1
            or any(width % 16 for width in (config.hidden_size, config.intermediate_size))
            or (features.attention_softcap is not None and "attention_softcap" not in fields["Decoder"])
        ):
            return None
        keep: list[Any] = [keys, values]  # the C structs hold raw pointers into all of these
        embedding = _embedding(backbone.embed_tokens, lm_head, keep)
        if embedding is None:
            return None
        rope = None
        layer_ropes: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        if kind.rope_per_layer:
            layer_ropes = _layer_rope_tables(backbone, keys.shape[3])  # type: ignore[assignment]
            if not layer_ropes:
                return None
            keep.extend(layer_ropes)
            rotary_dim = 2 * layer_ropes[0][0].shape[-1]  # type: ignore[index]
        else:
            rope = _rope_table(backbone, keys.shape[3])
            if rope is not None:
                keep.extend(rope)
            rotary_dim = _rotary_width(backbone)
        head_dim = keys.shape[-1]
        partial = kind.partial_rotary and rotary_dim % 2 == 0 and "rotary_dim" in fields["Decoder"]
        if rotary_dim > head_dim or (rotary_dim < head_dim and not partial):
            return None

        def matrix(linears: list[BlockLinear]) -> dict[str, Any]:
            matmul = fuse_blocks(linears)
            if matmul is None:
                raise _Unsupported
            keep.append(matmul)
            out = _matrix(matmul)
            if any(p.bias is not None for p in linears):
                if "bias" not in fields["Matrix"]:
                    raise _Unsupported
                bias = torch.cat(
                    [
                        torch.zeros(p.out_features) if p.bias is None else p.bias.detach().float()
                        for p in linears
                    ]
                ).contiguous()
                keep.append(bias)
                out["bias"] = ops.pointer(bias)
            return out

        def pointer_to(tensor: torch.Tensor) -> Any:
            keep.append(tensor)
            return ops.pointer(tensor)

        def weights(norm: Any) -> Any:
            return pointer_to(kind.norm_weight(norm))

        array = ops.new("Layer[]", len(layers))  # zeroed, owned by this cdata: kept below
        try:
            for i, (struct, layer) in enumerate(zip(array, layers, strict=True)):
                for field, norm in kind.layer_norms(layer).items():
                    if norm is not None:  # NULL: no norm there (OLMo 2's inputs)
                        setattr(struct, field, weights(norm))
                for field, bias in kind.norm_biases(layer).items():
                    if bias is not None:
                        setattr(struct, field, pointer_to(bias.detach()))
                qkv, o, gate_up, down = kind.projections(layer)
                struct.qkv, struct.o, struct.gate_up, struct.down = map(matrix, (qkv, o, gate_up, down))
                window = features.windows[i]
                if window is not None:  # kind.needs has the field where its layers have windows
                    struct.window = window
                table = layer_ropes[i]
                if table is not None:
                    struct.rope_cos, struct.rope_sin = ops.pointer(table[0]), ops.pointer(table[1])
                if not kind.rotates(layer):
                    struct.no_rope = 1
        except _Unsupported:
            return None
        keep.append(array)
        # The lm_head in C, where it is on native blocks and the logits need nothing after it (a
        # final soft cap or scale runs in torch, from the runner's _logits).
        head_in_c = (
            _native_blocks(lm_head)
            and lm_head.bias is None
            and (
                features.final_softcap is None
                and features.logit_scale is None
                and features.logits_divisor is None
            )
        )
        if head_in_c:
            keep.append(lm_head.matmul)  # its own blocks, no copy: held here too
        decoder_fields = {
            "layers": len(layers),
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "kv_heads": keys.shape[2],
            "head_dim": head_dim,
            "intermediate": config.intermediate_size,
            "eps": _eps(norms[0]),
            "attention_scale": layers[0].self_attn.scaling,
            "layer": array,
            "final_norm": weights(backbone.norm),
            # out_features 0 where the lm_head is not on native blocks
            "lm_head": _matrix(lm_head.matmul) if head_in_c else {},
            "rope_cos": ops.pointer(None if rope is None else rope[0]),
            "rope_sin": ops.pointer(None if rope is None else rope[1]),
            "cache_k": ops.pointer(keys),
            "cache_v": ops.pointer(values),
            "half_cache": int(keys.dtype == torch.float16),
            "max_rows": keys.shape[1],
            "max_len": keys.shape[3],
        }
        if rotary_dim < head_dim:
            decoder_fields["rotary_dim"] = rotary_dim
        if features.attention_softcap is not None:
            decoder_fields["attention_softcap"] = features.attention_softcap
        final_bias = getattr(backbone.norm, "bias", None)
        if final_bias is not None:
            decoder_fields["final_norm_bias"] = pointer_to(final_bias.detach())
        decoder = ops.new("Decoder *", decoder_fields | embedding | kind.decoder_fields(backbone))
        return cls(backbone, decoder, keep, rope_table=rope is not None or kind.rope_per_layer)

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


def _embedding(embed: Any, lm_head: Any, keep: list[Any]) -> dict[str, Any] | None:
    """Decoder's embedding fields: a float32 table, or where the embedding is looked up on the tied
    lm_head's blocks (gguf_loading.BlockEmbedding, no table) and this build takes it, those blocks,
    checked to give the rows its lookup gives, bit for bit; None where neither serves."""
    if isinstance(embed, BlockEmbedding) and "embedding_blocks" in ops.struct_fields("Decoder"):
        if not _native_blocks(lm_head):
            return None
        ids = torch.tensor(sorted({0, 1, embed.num_embeddings // 2, embed.num_embeddings - 1}))
        rows = torch.empty(len(ids), embed.embedding_dim)
        matrix = ops.new("Matrix *", _matrix(lm_head.matmul))
        ops.matrix_rows(matrix, ids, rows)
        if not torch.equal(rows, embed.lookup(ids)):
            return None
        keep.append(lm_head.matmul)
        return {"embedding": ops.pointer(None), "embedding_blocks": _matrix(lm_head.matmul)}
    if isinstance(embed, BlockEmbedding) and embed.embed_scale is not None:
        return None  # its table (.weight) is unscaled: Gemma's needs the fields above anyway
    table = embed.weight.detach()  # a BlockEmbedding on an older build: its table, made once
    if table.dtype != torch.float32 or not table.is_contiguous():
        return None
    keep.append(table)
    return {"embedding": ops.pointer(table)}


def _native_blocks(linear: Any) -> bool:
    return (
        isinstance(linear, BlockLinear)
        and isinstance(linear.matmul, Q4Matmul | Q8Matmul)
        and linear.matmul.kernel == "native"
    )


def _matrix(matmul: Q4Matmul | Q8Matmul) -> dict[str, Any]:
    """kernels.h's Matrix for a layer's blocks (the C struct points into them: keep them alive).
    8-bit blocks pass their minimums (Q5_1, Q5_K) and groups (16: Q6_K) too."""
    q4 = isinstance(matmul, Q4Matmul)
    return {
        "bits": 4 if q4 else 8,
        "int8_activations": int(matmul.activations == "int8"),
        "out_features": matmul.out_features,
        "in_features": matmul.in_features,
        "codes": ops.pointer(matmul.codes),
        "scale": ops.pointer(matmul.scale),
        "minimum": ops.pointer(matmul.minimum),
        "group": matmul.group if isinstance(matmul, Q8Matmul) else 0,
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


def _layer_rope_tables(backbone: Any, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's rotary cos and sin, [length, head_dim / 2], from its layer type's rope (Gemma 3:
    local and global bases), tables shared by the layers of a type; [] where a rope changes with the
    length, or its second half does not repeat the first (the C reads the first half only)."""
    rotary = backbone.rotary_emb
    types = backbone.config.layer_types[: len(backbone.layers)]
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_type in set(types):
        rope_type = rotary.rope_type.get(layer_type, "default")
        if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
            return []
        dummy = torch.empty(1, dtype=torch.float32)
        cos, sin = (t[0] for t in rotary(dummy, torch.arange(length)[None], layer_type))
        half = cos.shape[-1] // 2
        if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
            return []
        tables[layer_type] = (cos[:, :half].contiguous(), sin[:, :half].contiguous())
    return [tables[layer_type] for layer_type in types]


class _LayerKind:
    """What decoder_step.c needs to know of a model type's layers: a llama's by default (RMSNorms
    before attention and the MLP, a SiLU-gated MLP, biases where the config has them)."""

    norm_type: type = LlamaRMSNorm
    rope_per_layer = False  # a rotary table per layer (Layer.rope_cos), not the decoder's
    # Whether its modules rotate part of each head when the rope is partial (Phi-3's do; for the
    # others transformers' rope set-up reads partial_rotary_factor but their attention cannot apply it)
    partial_rotary = False
    needs: frozenset[str] = frozenset()  # kernels.h fields beyond a llama's that its layers set

    def accepts(self, config: Any) -> bool:
        return getattr(config, "hidden_act", None) == "silu"

    def projections(self, layer: Any) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        """The layer's q/k/v, o, gate/up and down projections, each group one matrix in C."""
        attention, mlp = layer.self_attn, layer.mlp
        return (
            [attention.q_proj, attention.k_proj, attention.v_proj],
            [attention.o_proj],
            [mlp.gate_proj, mlp.up_proj],
            [mlp.down_proj],
        )

    def layer_norms(self, layer: Any) -> dict[str, Any]:
        """Layer's norm fields -> the layer's norm modules (None: no norm there)"""
        return {"input_norm": layer.input_layernorm, "post_attention_norm": layer.post_attention_layernorm}

    def norm_biases(self, layer: Any) -> dict[str, Any]:
        """Layer's norm bias fields -> the biases (layer norms')"""
        return {}

    def rotates(self, layer: Any) -> bool:
        """Whether the layer rotates q and k (SmolLM3's NoPE layers do not)."""
        return True

    def norm_weight(self, norm: Any) -> torch.Tensor:
        """The weights x is multiplied by after it is normalized."""
        return norm.weight.detach()

    def decoder_fields(self, backbone: Any) -> dict[str, Any]:
        return {}


class _Qwen2(_LayerKind):
    """Qwen2, Qwen2.5: a llama with q/k/v biases and windowed layers."""

    norm_type: type = Qwen2RMSNorm
    needs = frozenset({"window"})


class _Mistral(_LayerKind):
    """Mistral: a llama with a sliding window on every layer."""

    norm_type: type = MistralRMSNorm
    needs = frozenset({"window"})


class _Qwen3(_LayerKind):
    """Qwen3: a llama with q/k heads normalized before the rotation, and windowed layers."""

    norm_type: type = Qwen3RMSNorm
    needs = frozenset({"window", "q_norm", "k_norm"})

    def layer_norms(self, layer: Any) -> dict[str, Any]:
        attention = layer.self_attn
        return super().layer_norms(layer) | {"q_norm": attention.q_norm, "k_norm": attention.k_norm}


class _Phi3(_LayerKind):
    """Phi-3: q/k/v and gate/up each one projection already; windowed layers; part of each head
    rotated (partial_rotary_factor, checked by build against the field)."""

    norm_type: type = Phi3RMSNorm
    partial_rotary = True
    needs = frozenset({"window"})

    def projections(self, layer: Any) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        return (
            [layer.self_attn.qkv_proj],
            [layer.self_attn.o_proj],
            [layer.mlp.gate_up_proj],
            [layer.mlp.down_proj],
        )


class _SmolLM3(_LayerKind):
    """SmolLM3: a llama whose NoPE layers (no_rope_layers) do not rotate; windowed layers."""

    norm_type: type = SmolLM3RMSNorm
    needs = frozenset({"window", "no_rope"})

    def rotates(self, layer: Any) -> bool:
        return bool(layer.self_attn.use_rope)


class _Granite(_LayerKind):
    """Granite 3: a llama with its embeddings, and each sublayer's output before its residual add,
    multiplied by the config's multipliers (the attention's is its scaling; the logits' divisor
    runs in torch after the lm_head)."""

    norm_type: type = GraniteRMSNorm
    needs = frozenset({"embedding_scale", "residual_scale"})

    def decoder_fields(self, backbone: Any) -> dict[str, Any]:
        config = backbone.config
        return {"embedding_scale": config.embedding_multiplier, "residual_scale": config.residual_multiplier}


class _Olmo2(_LayerKind):
    """OLMo 2: no norm before attention and the MLP, their outputs normalized before the residual
    adds, and q/k normalized over all heads at once before the rotation."""

    norm_type: type = Olmo2RMSNorm
    needs = frozenset({"attention_out_norm", "mlp_out_norm", "q_norm", "k_norm", "whole_qk_norm"})

    def layer_norms(self, layer: Any) -> dict[str, Any]:
        return {
            "input_norm": None,
            "post_attention_norm": None,
            "attention_out_norm": layer.post_attention_layernorm,
            "mlp_out_norm": layer.post_feedforward_layernorm,
            "q_norm": layer.self_attn.q_norm,
            "k_norm": layer.self_attn.k_norm,
        }

    def decoder_fields(self, backbone: Any) -> dict[str, Any]:
        return {"whole_qk_norm": 1}


class _Gemma(_LayerKind):
    """Gemma: embeddings times sqrt(hidden), (1 + w) RMSNorms, a GELU (tanh) gated MLP."""

    norm_type: type = GemmaRMSNorm
    needs = frozenset({"embedding_scale", "activation"})
    activation_setting = "hidden_act"  # Gemma 2 and 3 read hidden_activation

    def accepts(self, config: Any) -> bool:
        return getattr(config, self.activation_setting, None) == "gelu_pytorch_tanh" and not getattr(
            config, "use_bidirectional_attention", False
        )

    def norm_weight(self, norm: Any) -> torch.Tensor:
        return (1.0 + norm.weight.detach().float()).contiguous()  # as the Gemma norms' forward adds it

    def decoder_fields(self, backbone: Any) -> dict[str, Any]:
        embed = backbone.embed_tokens
        # the scale as the embedding's forward multiplies by it: in the rows' dtype, float32 here
        return {"embedding_scale": float(embed.embed_scale.to(torch.float32)), "activation": 1}


class _Gemma2(_Gemma):
    """Gemma 2: Gemma's, with the attention's and the MLP's outputs normalized before their residual
    adds, sliding-window layers and soft-capped attention scores (its final logit soft cap runs in
    torch after the lm_head)."""

    norm_type: type = Gemma2RMSNorm
    needs = _Gemma.needs | {"attention_out_norm", "mlp_out_norm", "window"}
    activation_setting = "hidden_activation"

    def layer_norms(self, layer: Any) -> dict[str, Any]:
        return {
            "input_norm": layer.input_layernorm,
            "post_attention_norm": layer.pre_feedforward_layernorm,  # the MLP's input
            "attention_out_norm": layer.post_attention_layernorm,
            "mlp_out_norm": layer.post_feedforward_layernorm,
        }


class _Gemma3(_Gemma2):
    """Gemma 3 (transformers' Gemma3DecoderLayer): Gemma 2's layers without the attention soft cap,
    with q/k heads normalized before the rotation and local and global rope bases per layer type."""

    norm_type: type = Gemma3RMSNorm
    rope_per_layer = True
    needs = _Gemma2.needs | {"q_norm", "k_norm", "rope_cos"}

    def layer_norms(self, layer: Any) -> dict[str, Any]:
        return super().layer_norms(layer) | {
            "q_norm": layer.self_attn.q_norm,
            "k_norm": layer.self_attn.k_norm,
        }


class _StarCoder2(_LayerKind):
    """StarCoder2: layer norms with biases, biases on every projection, an ungated GELU (tanh) MLP
    (c_fc, c_proj), windowed layers."""

    norm_type: type = nn.LayerNorm
    needs = frozenset(
        {"layer_norm", "input_norm_bias", "final_norm_bias", "ungated_mlp", "activation", "window"}
    )

    def accepts(self, config: Any) -> bool:
        return config.hidden_act == "gelu_pytorch_tanh"

    def projections(self, layer: Any) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        attention = layer.self_attn
        return (
            [attention.q_proj, attention.k_proj, attention.v_proj],
            [attention.o_proj],
            [layer.mlp.c_fc],
            [layer.mlp.c_proj],
        )

    def norm_biases(self, layer: Any) -> dict[str, Any]:
        return {
            "input_norm_bias": layer.input_layernorm.bias,
            "post_attention_norm_bias": layer.post_attention_layernorm.bias,
        }

    def decoder_fields(self, backbone: Any) -> dict[str, Any]:
        return {"layer_norm": 1, "ungated_mlp": 1, "activation": 1}


class _Cohere(_LayerKind):
    """Command R: layer norms without biases; attention and MLP in parallel on the same normed input;
    the rope over interleaved pairs; q/k layer norms with a row of weights per head (use_qk_norm);
    its logit scale runs in torch after the lm_head."""

    norm_type: type = CohereLayerNorm
    needs = frozenset({"layer_norm", "parallel", "interleaved_rope", "qk_norm_per_head", "q_norm"})

    def layer_norms(self, layer: Any) -> dict[str, Any]:
        attention = layer.self_attn
        qk = {"q_norm": attention.q_norm, "k_norm": attention.k_norm} if attention.use_qk_norm else {}
        return {"input_norm": layer.input_layernorm, "post_attention_norm": None} | qk

    def norm_weight(self, norm: Any) -> torch.Tensor:
        return norm.weight.detach().reshape(-1).contiguous()  # q/k: [heads, head_dim], a row per head

    def decoder_fields(self, backbone: Any) -> dict[str, Any]:
        return {"layer_norm": 1, "parallel": 1, "interleaved_rope": 1, "qk_norm_per_head": 1}


_KINDS: dict[str, _LayerKind] = {
    "llama": _LayerKind(),
    "mistral": _Mistral(),
    "qwen2": _Qwen2(),
    "qwen3": _Qwen3(),
    "phi3": _Phi3(),
    "smollm3": _SmolLM3(),
    "granite": _Granite(),
    "olmo2": _Olmo2(),
    "gemma": _Gemma(),
    "gemma2": _Gemma2(),
    "gemma3_text": _Gemma3(),
    "starcoder2": _StarCoder2(),
    "cohere": _Cohere(),
}


def _eps(norm: Any) -> float:
    """An RMSNorm's epsilon (llama's modules call it variance_epsilon, Gemma's eps)."""
    eps = getattr(norm, "variance_epsilon", None)
    return float(norm.eps if eps is None else eps)


def _rotary_width(backbone: Any) -> int:
    """How many of each head's dimensions the model's rope rotates (its cos's width)."""
    cos, _ = backbone.rotary_emb(torch.empty(1), position_ids=torch.zeros(1, 1, dtype=torch.long))
    return int(cos.shape[-1])


class _Unsupported(Exception):
    pass
