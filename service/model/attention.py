"""Attention over the slotted KV cache: the function transformers calls in every layer, and the
batch-invariant decode attention it runs (decode_attention.c, or torch's ops without the kernels).

Each live sequence owns a row of `[layers, rows, kv_heads, max_len, head_dim]`; the step sets a
StepContext (positions, slots, packed prefill chunks) and every layer's call reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from tokenwire.service.kernels import ops


@dataclass
class StepContext:
    """What the attention function needs for the forward in flight (set by the step, read per layer)."""

    decode: bool = True
    # decode: the position each row's new token takes, [n] int64; prefill: each prompt token's
    positions: torch.Tensor | None = None
    # prefill, C attention: each prompt token's cache row, [q_len] int64
    slots: torch.Tensor | None = None
    # decode, torch attention: rows 0..n-1, mask [n, 1, 1, kv_len]
    kv_len: int = 0
    # decode: offset of (row, kv_head, position) in the layer cache viewed as [-1, head_dim]
    flat_index: torch.Tensor | None = None
    # prefill: the chunks packed one after another in a single row of the batch, in order:
    # (cache row, start position, chunk length)
    prefill_rows: list[tuple[int, int, int]] = field(default_factory=list)


class SlotAttention:
    """The attention function registered with transformers; holds the cache it writes into."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, model_dtype: torch.dtype) -> None:
        self.keys = keys
        self.values = values
        self.ctx = StepContext()
        # decode_attention.c: a float32 model on CPU (its cache float32, or float16 by cache_dtype),
        # a head_dim it takes. A float16 model keeps torch's ops: the C reads activations as float32.
        self.native = (
            ops.available()
            and keys.device.type == "cpu"
            and model_dtype == torch.float32
            and _c_head_dim(keys.shape[-1])
        )

    def whole_key_blocks(self, length: int) -> int:
        """How many positions to copy so that a row's first `length` keys move whole: the C
        attention stores keys in blocks of KEY_BLOCK positions (see keys_in_order)."""
        return -(-length // KEY_BLOCK) * KEY_BLOCK if self.native else length

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [batch, heads, q_len, head_dim]
        key: torch.Tensor,  # [batch, kv_heads, q_len, head_dim]
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        layer: int = module.layer_idx  # type: ignore[assignment]
        cache_k, cache_v = self.keys[layer], self.values[layer]
        ctx = self.ctx
        if ctx.decode and self.native:
            assert ctx.positions is not None
            out = native_decode_attention(query, key, value, cache_k, cache_v, ctx.positions, scaling)
        elif ctx.decode:
            n = query.shape[0]
            assert ctx.flat_index is not None
            head_dim = key.shape[-1]
            cache_k.view(-1, head_dim).index_copy_(0, ctx.flat_index, key.reshape(-1, head_dim))
            cache_v.view(-1, head_dim).index_copy_(0, ctx.flat_index, value.reshape(-1, head_dim))
            out = decode_attention(
                query, cache_k[:n, :, : ctx.kv_len], cache_v[:n, :, : ctx.kv_len], attention_mask, scaling
            )
        elif self.native:  # a prefill (the C step's way, for models it does not run whole)
            assert ctx.positions is not None and ctx.slots is not None
            tokens = query[0].transpose(0, 1)[:, :, None]  # [q_len, heads, 1, head_dim]: a row per token
            out = native_decode_attention(
                tokens,
                key[0].transpose(0, 1)[:, :, None],
                value[0].transpose(0, 1)[:, :, None],
                cache_k,
                cache_v,
                ctx.positions,
                scaling,
                slots=ctx.slots,
            )
            out = out[:, :, 0].transpose(0, 1)[None]
        else:
            outs = []
            offset = 0
            for row, start, length in ctx.prefill_rows:
                end = start + length
                packed = slice(offset, offset + length)
                cache_k[row, :, start:end] = key[0, :, packed]
                cache_v[row, :, start:end] = value[0, :, packed]
                outs.append(
                    F.scaled_dot_product_attention(
                        query[:, :, packed],
                        cache_k[row : row + 1, :, :end].to(query.dtype),  # a copy, if the cache is float16
                        cache_v[row : row + 1, :, :end].to(query.dtype),
                        attn_mask=_prefill_mask(start, length, query.device),
                        scale=scaling,
                        enable_gqa=True,
                    )
                )
                offset += length
            out = torch.cat(outs, dim=2)
        return out.transpose(1, 2), None


def _c_head_dim(head_dim: int) -> bool:
    """Whether decode_attention.c takes this head size."""
    return head_dim % 16 == 0 and head_dim <= 256


def cache_dtype(device: torch.device, dtype: torch.dtype, activations: str, head_dim: int) -> torch.dtype:
    """float16 where the block layers already round their activations to 8 bits and the C attention
    takes it (as llama.cpp keeps its cache): a decode step reads every row's keys and values, and at
    16 rows that read is most of attention's time; float16 rounds them by ~2e-4 relative, far less
    than 8-bit activations round (values beyond 65,504 would become inf; these models' keys and
    values stay far below). Elsewhere the model's dtype, so dense or float32 runs stay exact."""
    if (
        device.type == "cpu"
        and dtype == torch.float32
        and activations == "int8"
        and _c_head_dim(head_dim)
        and ops.half_kv_cache()
    ):
        return torch.float16
    return dtype


ATTENTION_BLOCK = 64  # key positions per partial product; decode key lengths are padded to a multiple


def whole_blocks(length: int) -> int:
    """`length` rounded up to a multiple of ATTENTION_BLOCK."""
    return -(-length // ATTENTION_BLOCK) * ATTENTION_BLOCK


def decode_attention(
    query: torch.Tensor,  # [rows, heads, 1, head_dim]
    keys: torch.Tensor,  # [rows, kv_heads, kv_len, head_dim]
    values: torch.Tensor,
    mask: torch.Tensor | None,  # [rows, 1, 1, kv_len] bool, True = attend; None = attend to all
    scale: float | None = None,
) -> torch.Tensor:
    """Attention for one new token per row, whose result for a row does not depend on the others.

    Rows of a decode step share one key length (the longest row's), the rest masked. SDPA's CPU
    kernel sums in an order that depends on that length, so a row's output changed with the batch
    it ran in: in float32 that stayed below the noise, but the bfloat16 inputs of the Q4_1 matmuls
    round it into different tokens within a few dozen steps. Here every reduction has a fixed shape
    or order: scores are one matmul per (row, kv head) over the head dimension with at least 64
    keys (MKL takes another path for very few), the softmax runs on a multiple of 64 positions
    (torch sums any tail past 16 as zeros), and `probs @ values` is one [group, 64] x [64, head_dim]
    product per block of 64 keys, the blocks added in order. Padding then only adds exact zeros
    (tests check up to 400 keys; checked by hand to 2,000). Faster than SDPA here: 16 rows, 192
    keys, ~0.3 vs 0.43 ms a layer (one matmul over all blocks instead of the loop needed a copy of
    the values and took 2.7x as long).
    """
    rows, heads, _, head_dim = query.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    if mask is None:
        mask = torch.ones(rows, 1, 1, kv_len, dtype=torch.bool, device=query.device)
    padding = whole_blocks(kv_len) - kv_len
    if padding:
        keys = F.pad(keys, (0, 0, 0, padding))
        values = F.pad(values, (0, 0, 0, padding))
        mask = F.pad(mask, (0, padding), value=False)
        kv_len += padding
    grouped = query.view(rows, kv_heads, group, head_dim)  # the query heads sharing one kv head
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * (head_dim**-0.5 if scale is None else scale)
    probs = torch.softmax(torch.where(mask, scores, float("-inf")), dim=-1)
    # Views, no copies: rows and kv heads fold into one batch dimension in the cache's layout.
    probs = probs.view(rows * kv_heads, group, kv_len)
    values = values.reshape(rows * kv_heads, kv_len, head_dim)
    out = torch.bmm(probs[:, :, :ATTENTION_BLOCK], values[:, :ATTENTION_BLOCK])
    for start in range(ATTENTION_BLOCK, kv_len, ATTENTION_BLOCK):
        end = start + ATTENTION_BLOCK
        out = out + torch.bmm(probs[:, :, start:end], values[:, start:end])
    return out.view(rows, heads, 1, head_dim)


KEY_BLOCK = 16  # decode_attention.c's keys: blocks of 16 positions, each stored dimension-major


def keys_in_order(cache_k: torch.Tensor) -> torch.Tensor:
    """A key cache as decode_attention.c writes it ([..., max_len, head_dim], blocks of KEY_BLOCK
    positions stored [head_dim][KEY_BLOCK]), by position: [..., max_len, head_dim], a copy."""
    *lead, max_len, head_dim = cache_k.shape
    blocked = cache_k.reshape(*lead, max_len // KEY_BLOCK, head_dim, KEY_BLOCK)
    return blocked.transpose(-1, -2).reshape(*lead, max_len, head_dim)


def native_decode_attention(
    query: torch.Tensor,  # [rows, heads, 1, head_dim]
    key: torch.Tensor,  # [rows, kv_heads, 1, head_dim]: written into the cache at `positions`
    value: torch.Tensor,
    cache_k: torch.Tensor,  # [max_rows, kv_heads, max_len, head_dim], keys in decode_attention.c's blocks
    cache_v: torch.Tensor,
    positions: torch.Tensor,  # [rows] int64
    scale: float | None,
    slots: torch.Tensor | None = None,  # [rows] int64: each row's cache row (a prefill); default row r
) -> torch.Tensor:
    """decode_attention.c: the same result as `decode_attention`, batch-invariant too, in one call."""
    rows, heads, _, head_dim = query.shape
    assert query.dtype == key.dtype == value.dtype == torch.float32, "decode_attention.c reads float32"
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty(rows, heads, 1, head_dim, dtype=torch.float32)
    ops.decode_attention(
        query, key, value, cache_k, cache_v, positions, slots, head_dim**-0.5 if scale is None else scale, out
    )
    return out


def _prefill_mask(start: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask for queries start..start+length over keys 0..start+length."""
    query_pos = torch.arange(start, start + length, device=device)[:, None]
    key_pos = torch.arange(start + length, device=device)[None, :]
    return key_pos <= query_pos
