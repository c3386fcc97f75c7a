"""Attention over the slotted KV cache: the function transformers calls in every layer, and the
batch-invariant decode attention it runs (decode_attention.c, or torch's ops without the kernels).

Each live sequence owns a row of `[layers, rows, kv_heads, max_len, head_dim]`; the step sets a
StepContext (positions, slots, packed prefill chunks) and every layer's call reads it.

A layer may have a sliding window (it attends to its last `window` positions, itself included, as
transformers' sliding_window_overlay: key > query - window) and its scores may be soft-capped
(softcap * tanh(scores / softcap), before the mask, as transformers' eager attention).
decode_attention.c takes both (it reads only a window's keys). Without the kernels (or off the CPU,
or a dense float16 model) torch's ops run it and the cache keeps torch's layout (SlotAttention.native
is False), where the window is applied by the mask. Either way the cache holds every position of a
row. A window no shorter than the context excludes nothing and is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from tokenwire.service.kernels import ops
from tokenwire.service.model.architectures import UnsupportedModelError


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
    # decode, torch attention: the step's mask narrowed to each window, made by the first layer asking
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, mask: torch.Tensor | None, window: int | None) -> torch.Tensor | None:
        """The decode mask [n, 1, 1, kv_len] (True = attend) for a layer with this window."""
        if window is None or mask is None:
            return mask
        narrowed = self.window_masks.get(window)
        if narrowed is None:
            assert self.positions is not None
            keys = torch.arange(mask.shape[-1], device=mask.device)
            inside = keys[None, :] > (self.positions[:, None] - window)
            narrowed = self.window_masks[window] = mask & inside[:, None, None, :]
        return narrowed


# Arguments transformers' attention modules pass that change nothing here (inference, no cache).
_IGNORED_ARGUMENTS = frozenset(
    {"position_ids", "cache_position", "output_attentions", "use_cache", "cache", "past_key_values"}
)


class SlotAttention:
    """The attention function registered with transformers; holds the cache it writes into.

    `windows` gives each layer's sliding window (None: its whole prefix), `softcap` the model's score
    soft cap, both as architectures.model_features found them in the config; every call checks that
    the layer asks for exactly that, so a module that wants something else fails instead of running
    wrong. `context_length`: the longest sequence a row holds (default: the cache's length).
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        model_dtype: torch.dtype,
        *,
        windows: Sequence[int | None] | None = None,
        softcap: float | None = None,
        context_length: int | None = None,
    ) -> None:
        self.keys = keys
        self.values = values
        self.ctx = StepContext()
        self.context_length = context_length or keys.shape[3]
        self.windows = effective_windows(windows or (None,) * keys.shape[0], self.context_length)
        self.softcap = softcap
        # decode_attention.c: a float32 model on CPU (its cache float32, or float16 by cache_dtype),
        # a head_dim it takes. A float16 model keeps torch's ops: the C reads activations as float32.
        self.native = native_attention(keys.device, model_dtype, keys.shape[-1])

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
        sliding_window: int | None = None,
        softcap: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        layer: int = module.layer_idx  # type: ignore[assignment]
        window = self.windows[layer]
        self._check(layer, sliding_window, softcap, dropout, kwargs)
        softcap = self.softcap
        cache_k, cache_v = self.keys[layer], self.values[layer]
        ctx = self.ctx
        if ctx.decode and self.native:
            assert ctx.positions is not None
            out = native_decode_attention(
                query, key, value, cache_k, cache_v, ctx.positions, scaling, window=window, softcap=softcap
            )
        elif ctx.decode:
            n = query.shape[0]
            assert ctx.flat_index is not None
            head_dim = key.shape[-1]
            cache_k.view(-1, head_dim).index_copy_(0, ctx.flat_index, key.reshape(-1, head_dim))
            cache_v.view(-1, head_dim).index_copy_(0, ctx.flat_index, value.reshape(-1, head_dim))
            out = decode_attention(
                query,
                cache_k[:n, :, : ctx.kv_len],
                cache_v[:n, :, : ctx.kv_len],
                ctx.decode_mask(attention_mask, window),
                scaling,
                softcap,
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
                window=window,
                softcap=softcap,
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
                # Keys before the first query's window are masked for every query: not read at all.
                first = 0 if window is None else max(0, start - window + 1)
                outs.append(
                    prefill_attention(
                        query[:, :, packed],
                        cache_k[row : row + 1, :, first:end].to(query.dtype),  # a copy if it is float16
                        cache_v[row : row + 1, :, first:end].to(query.dtype),
                        _prefill_mask(start, length, first, window, query.device),
                        scaling,
                        softcap,
                    )
                )
                offset += length
            out = torch.cat(outs, dim=2)
        return out.transpose(1, 2), None

    def _check(
        self, layer: int, window: int | None, softcap: float | None, dropout: float, kwargs: dict[str, Any]
    ) -> None:
        """Refuse a call asking for attention other than the config said (see the class docstring)."""
        expected = self.windows[layer]
        (window,) = effective_windows([window], self.context_length)
        unknown = sorted(k for k, v in kwargs.items() if k not in _IGNORED_ARGUMENTS and v is not None)
        if window != expected or softcap != self.softcap or dropout or unknown:
            raise UnsupportedModelError(
                f"layer {layer}'s attention asks for sliding_window={window}, softcap={softcap}, "
                f"dropout={dropout}"
                + (f" and {', '.join(unknown)}" if unknown else "")
                + f"; its config said sliding_window={expected}, softcap={self.softcap}, no dropout"
            )


def _c_head_dim(head_dim: int) -> bool:
    """Whether decode_attention.c takes this head size."""
    return head_dim % 16 == 0 and head_dim <= 256


def effective_windows(windows: Sequence[int | None], context_length: int) -> tuple[int | None, ...]:
    """Each layer's window where it can exclude a key within `context_length` positions; else None."""
    return tuple(w if w is not None and w < context_length else None for w in windows)


def native_attention(device: torch.device, model_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether decode_attention.c can run this model's attention (see SlotAttention)."""
    return ops.available() and device.type == "cpu" and model_dtype == torch.float32 and _c_head_dim(head_dim)


def cache_dtype(device: torch.device, dtype: torch.dtype, activations: str, head_dim: int) -> torch.dtype:
    """float16 where the block layers already round their activations to 8 bits and the C attention
    takes it (as llama.cpp keeps its cache): a decode step reads every row's keys and values, and at
    16 rows that read is most of attention's time; float16 rounds them by ~2e-4 relative, far less
    than 8-bit activations round (values beyond 65,504 would become inf; these models' keys and
    values stay far below). Elsewhere the model's dtype, so dense or float32 runs stay exact."""
    if native_attention(device, dtype, head_dim) and activations == "int8" and ops.half_kv_cache():
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
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap), before the mask
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
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
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
    window: int | None = None,  # attend to each row's last `window` positions; None: all
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap); None: none
) -> torch.Tensor:
    """decode_attention.c: the same result as `decode_attention`, batch-invariant too, in one call."""
    rows, heads, _, head_dim = query.shape
    assert query.dtype == key.dtype == value.dtype == torch.float32, "decode_attention.c reads float32"
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty(rows, heads, 1, head_dim, dtype=torch.float32)
    scale = head_dim**-0.5 if scale is None else scale
    ops.decode_attention(query, key, value, cache_k, cache_v, positions, slots, scale, out, window, softcap)
    return out


def prefill_attention(
    query: torch.Tensor,  # [1, heads, q_len, head_dim]
    keys: torch.Tensor,  # [1, kv_heads, kv_len, head_dim]
    values: torch.Tensor,
    mask: torch.Tensor,  # [q_len, kv_len] bool, True = attend
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """One prefill chunk's attention over its row's keys: SDPA, or with a soft cap (which SDPA does
    not take) the ops of transformers' eager attention."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * (
        query.shape[-1] ** -0.5 if scale is None else scale
    )
    scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(query.dtype), values)


def _prefill_mask(
    start: int, length: int, first: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Causal mask for queries start..start+length over keys first..start+length, within a window."""
    query_pos = torch.arange(start, start + length, device=device)[:, None]
    key_pos = torch.arange(first, start + length, device=device)[None, :]
    mask = key_pos <= query_pos
    return mask if window is None else mask & (key_pos > query_pos - window)
