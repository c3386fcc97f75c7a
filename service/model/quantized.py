"""Linear layers that keep a GGUF file's quantized blocks and multiply on them directly.

A Q4_1 block holds 32 weights of one output row as `w = d * q + m` (q in 0..15, d and m float16).
These are the weights the GGUF file ships, not a second quantization of them. The other common
types are repacked at load into one of two layouts that give the same float32 weights exactly
(gguf_blocks.py reads them; each type is tested against the `gguf` package's dequantization):

- Q4Weight (4-bit codes, a scale and a minimum per 32): Q4_1 as it is; Q4_0 (`d * (q - 8)`: scale d,
  minimum -8d); Q4_K, whose sub-blocks of 32 are affine (`d*sc * q - dmin*m`, both products exact
  in float32: an 11-bit mantissa times a 6-bit integer).
- Q8Weight (8-bit signed codes, a scale per group of 32 or 16, a minimum per group or none): Q8_0;
  Q5_0 (codes q - 16); Q5_1 and Q5_K (codes 0..31 with a minimum); Q6_K (codes q - 32, scale d*sc
  per sub-block of 16: an 11-bit mantissa times an 8-bit integer, exact).

Two kernels take Q4Weight:

- "native", the C kernels compiled at set-up (kernels/ops.py), on the file's weights exactly:
  - block_matmul_int8.c, where the CPU has AVX512-VNNI (the default there): activations rounded to
    8 bits per block of 32, as llama.cpp does, and integer dot products. A decode step of the
    default model ~13.6 ms instead of ~30 at 16 rows, ~3.9 instead of ~6.7 for one; NLL +0.005.
  - block_matmul.c: float32 activations as they are, one multiply-add chain per output. ~200
    GFLOP/s at 16 rows here against the torch kernel's ~110; gate+up (576 -> 3072) 0.37-0.43 ms
    instead of 0.66-0.70 at 16 rows, ~0.10 ms for one row either way.
- "torch", `_weight_int4pack_mm_for_cpu`, where no C compiler is available. It computes groups of
  32 as `w = (q - 8) * scale + zero`, so the blocks map onto it exactly (scale = d, zero = m + 8d)
  but rounded to bfloat16, as are its activations, the only dtype it vectorises (float16 inputs
  took 50 ms instead of 0.44). It dequantizes the weights again for every 4 rows.

Both compute every output element in the same order whatever the number of rows or columns, so a
row's result does not depend on its batch (checked in tests), and fusing q/k/v or gate/up into one
matrix gives the same bits as separate matmuls. Against float32 MKL on the layers' weights they
are faster (gate+up for one row 0.064-0.10 ms instead of ~0.35) and the packed weights take a
sixth of the memory (the blocks are unpacked from the native layout when layers are fused or checked).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenwire.service.kernels import ops

log = logging.getLogger("tokenwire.model")

GROUP = 32  # weights per Q4_1 block, and the kernel's group size
_KERNEL_DTYPE = torch.bfloat16


@dataclass
class Q4Weight:
    """A [out, in] weight as 4-bit codes with per-group scale and minimum (float32)."""

    codes: torch.Tensor  # [out, in] uint8, values 0..15
    scale: torch.Tensor  # [out, in / GROUP]
    minimum: torch.Tensor  # [out, in / GROUP]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        out, inp = self.shape
        blocks = self.codes.view(out, inp // GROUP, GROUP).float()
        weight = blocks * self.scale[..., None] + self.minimum[..., None]
        return weight.view(out, inp)

    @staticmethod
    def concat(parts: list[Q4Weight]) -> Q4Weight:
        """Stack along the output dimension (fused q/k/v or gate/up)."""
        return Q4Weight(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.minimum for p in parts]),
        )


@dataclass
class Q8Weight:
    """A [out, in] weight as 8-bit signed codes with a scale per group of 32 or 16 inputs, and a
    minimum per group or none: w = d * q (+ m). GGUF Q8_0 as it is; Q5_0, Q5_1, Q5_K, Q6_K repacked."""

    codes: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out, in / group] float32
    minimum: torch.Tensor | None = None  # [out, in / group] float32

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def group(self) -> int:
        return self.shape[1] // int(self.scale.shape[1])

    @property
    def layout(self) -> tuple[int, bool]:
        """What the kernels must agree on to stack two weights: (group, has a minimum)."""
        return (self.group, self.minimum is not None)

    def dequantize(self) -> torch.Tensor:
        out, inp = self.shape
        group = self.group
        weight = self.codes.view(out, inp // group, group).float() * self.scale[..., None]
        if self.minimum is not None:
            weight = weight + self.minimum[..., None]
        return weight.view(out, inp)

    @staticmethod
    def concat(parts: list[Q8Weight]) -> Q8Weight:
        minimums = [p.minimum for p in parts]
        return Q8Weight(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            None if any(m is None for m in minimums) else torch.cat(minimums),  # type: ignore[arg-type]
        )


BlockWeight = Q4Weight | Q8Weight


class Q4Matmul:
    """`x @ weight.T` on Q4_1 blocks: x of any leading shape, result in x's dtype.

    kernel "native" is the C kernels, "torch" is torch's int4 kernel; "auto" takes native where
    it could be built. activations: what the weights multiply (`.activations` says which ran):
    "int8" (block_matmul_int8.c, rounded per block of 32 as llama.cpp does, ~2-3x faster again),
    "float32" (block_matmul.c, x as it is), "auto" int8 where the CPU has the instructions for it;
    torch's kernel always rounds them to bfloat16.
    """

    def __init__(self, weight: Q4Weight, kernel: str = "auto", activations: str = "auto") -> None:
        out, inp = weight.shape
        self.out_features = out
        self.in_features = inp
        native = kernel in ("auto", "native") and out % ops.TILE == 0 and ops.available()
        if kernel == "native" and not native:
            raise RuntimeError("the native kernel is not available here")
        self.kernel = "native" if native else "torch"
        self.activations = _activations(native, activations)
        if self.activations == "int8":  # block_matmul_int8.c's layout (see there)
            lines = weight.codes.view(out // ops.TILE, ops.TILE, inp // 8, 2, 4).permute(0, 2, 1, 4, 3)
            self.codes = (lines[..., 0] | (lines[..., 1] << 4)).contiguous()  # [tiles, in / 8, 16, 4]
        elif native:  # block_matmul.c's layout (see there)
            codes = weight.codes.view(out // ops.TILE, ops.TILE, inp // 2, 2).permute(0, 2, 3, 1)
            self.codes = (codes[:, :, 0] | (codes[:, :, 1] << 4)).contiguous()  # [tiles, in / 2, 16]
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), 1)
            zero = weight.minimum + 8 * weight.scale  # the kernel subtracts 8 from every code
            self.scales_and_zeros = (
                torch.stack([weight.scale, zero], dim=-1).transpose(0, 1).contiguous().to(_KERNEL_DTYPE)
            )  # [in / GROUP, out, 2]
        if native:
            self.scale, self.minimum = _tiled(weight.scale), _tiled(weight.minimum)

    def blocks(self) -> Q4Weight:
        """The weight unpacked from the native layout (torch's int4 packing cannot be unpacked)."""
        assert self.kernel == "native"
        out, inp = self.out_features, self.in_features
        if self.activations == "int8":
            nibbles = torch.stack([self.codes & 0x0F, self.codes >> 4], dim=-1)  # [tiles, in / 8, 16, 4, 2]
            codes = nibbles.permute(0, 2, 1, 4, 3).reshape(out, inp)
        else:
            pairs = torch.stack([self.codes & 0x0F, self.codes >> 4], dim=2)  # [tiles, in / 2, 2, 16]
            codes = pairs.permute(0, 3, 1, 2).reshape(out, inp)
        return Q4Weight(codes, _untiled(self.scale), _untiled(self.minimum))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return _native_matmul(self, x, self.minimum)
        flat = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_and_zeros)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Q8Matmul:
    """`x @ weight.T` on Q8_0 blocks, through the C kernels (torch has none for them); activations
    as for Q4Matmul."""

    def __init__(self, weight: Q8Weight, activations: str = "auto") -> None:
        out, inp = weight.shape
        if not ops.available() or out % ops.TILE:
            raise RuntimeError("8-bit blocks need the native kernel, for a multiple of 16 outputs")
        if weight.group not in (16, GROUP):
            raise ValueError(f"8-bit blocks come in groups of 16 or 32 inputs, not {weight.group}")
        self.group = weight.group
        self.out_features = out
        self.in_features = inp
        self.kernel = "native"
        self.activations = _activations(True, activations)
        if self.activations == "int8":  # block_matmul_int8.c's layout: [tiles, in / 4, 16, 4], code + 128
            shifted = weight.codes.view(torch.uint8) ^ 0x80
            self.codes = shifted.view(out // ops.TILE, ops.TILE, inp // 4, 4).transpose(1, 2).contiguous()
        else:  # block_matmul.c's layout: [tiles, in, 16]
            self.codes = weight.codes.view(out // ops.TILE, ops.TILE, inp).transpose(1, 2).contiguous()
        self.scale = _tiled(weight.scale)
        self.minimum = None if weight.minimum is None else _tiled(weight.minimum)

    def blocks(self) -> Q8Weight:
        """The weight unpacked from the native layout."""
        if self.activations == "int8":
            shifted = self.codes.transpose(1, 2).reshape(self.out_features, self.in_features)
            codes = (shifted ^ 0x80).view(torch.int8)
        else:
            codes = self.codes.transpose(1, 2).reshape(self.out_features, self.in_features)
        return Q8Weight(codes, _untiled(self.scale), None if self.minimum is None else _untiled(self.minimum))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _native_matmul(self, x, self.minimum)


ACTIVATIONS = ("auto", "int8", "float32")


def _activations(native: bool, requested: str) -> str:
    """What a matmul's activations will be, on the C kernels or not: see Q4Matmul."""
    if requested not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, not {requested!r}")
    int8 = native and ops.int8_activations()
    if not native and requested != "int8":
        return "bfloat16"  # torch's int4 kernel
    if requested == "int8" and not int8:
        raise RuntimeError(
            "8-bit activations need the C kernels built for AVX512-VNNI, and a width that is a multiple of 16"
        )
    return "int8" if int8 and requested != "float32" else "float32"


def _tiled(per_group: torch.Tensor) -> torch.Tensor:
    """[out, groups] -> [out / 16, groups, 16]: a tile's 16 columns side by side, per group."""
    out, groups = per_group.shape
    return per_group.view(out // ops.TILE, ops.TILE, groups).transpose(1, 2).contiguous()


def _untiled(tiled: torch.Tensor) -> torch.Tensor:
    """The inverse of _tiled."""
    tiles, groups, tile = tiled.shape
    return tiled.transpose(1, 2).reshape(tiles * tile, groups)


def _native_matmul(
    matmul: Q4Matmul | Q8Matmul, x: torch.Tensor, minimum: torch.Tensor | None
) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    out = torch.empty(flat.shape[0], matmul.out_features, dtype=torch.float32)
    bits, group = (4, GROUP) if isinstance(matmul, Q4Matmul) else (8, matmul.group)
    ops.block_matmul(
        bits, matmul.activations == "int8", flat, matmul.codes, matmul.scale, minimum, out, group
    )
    return out.to(x.dtype).view(*x.shape[:-1], matmul.out_features)


def block_matmul(weight: BlockWeight, activations: str = "auto") -> Q4Matmul | Q8Matmul:
    if isinstance(weight, Q4Weight):
        return Q4Matmul(weight, activations=activations)
    return Q8Matmul(weight, activations)


def fuse_blocks(linears: list[Any]) -> Q4Matmul | Q8Matmul | None:
    """One matmul over several block layers of the same input, outputs side by side (the same bits
    as separate matmuls); None unless all are BlockLinear of one format and activations."""
    if not all(isinstance(p, BlockLinear) for p in linears):
        return None
    if len({(p.layout, p.matmul.activations) for p in linears}) != 1:
        return None
    blocks = [p.weight_blocks for p in linears]
    first = linears[0].matmul
    # torch's kernel has no choice to pass on (its activations are always bfloat16)
    return block_matmul(
        type(blocks[0]).concat(blocks), first.activations if first.kernel == "native" else "auto"
    )


def block_format(model: Any) -> str:
    """What GetModelInfo reports: the GGUF type of most block layers ("q4_1" for the default model,
    whose lm_head alone is Q8_0), or "dense" when there are none."""
    kinds = Counter(m.format for m in model.modules() if isinstance(m, BlockLinear))
    return max(kinds, key=lambda kind: (kinds[kind], kind)) if kinds else "dense"


def block_activations(model: Any) -> str:
    """What the block layers multiply ("int8", "float32", "bfloat16"), or "" if there are none."""
    kinds = sorted({m.matmul.activations for m in model.modules() if isinstance(m, BlockLinear)})
    return "+".join(kinds)


@dataclass(frozen=True)
class _Released:
    """A released BlockLinear's matmul: says what it was, runs nothing."""

    kernel: str
    activations: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this layer's blocks were released: decoder_step.c runs it")

    def blocks(self) -> BlockWeight:
        raise RuntimeError("this layer's blocks were released: decoder_step.c holds them, fused")


class BlockLinear(nn.Module):
    """Drop-in for an nn.Linear whose weight came from a GGUF tensor of blocks; `format` names the
    file's type ("q4_k", ...; by default "q4_1" or "q8_0" after the layout). `bias`: the layer's own
    parameter where it has one (Qwen2's q/k/v), added to the outputs as nn.Linear adds it."""

    bias: nn.Parameter | None

    def __init__(
        self,
        weight: BlockWeight,
        activations: str = "auto",
        format: str | None = None,
        bias: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.bias = bias
        self.format = format or ("q4_1" if isinstance(weight, Q4Weight) else "q8_0")
        self.layout = (type(weight).__name__, *(weight.layout if isinstance(weight, Q8Weight) else ()))
        self.out_features, self.in_features = weight.shape
        self.matmul: Q4Matmul | Q8Matmul | _Released = block_matmul(weight, activations)
        # Kept only for torch's int4 kernel, whose packing cannot be unpacked: the native layout
        # holds the same blocks, and keeping both cost ~160 MB (a byte per code) for SmolLM2.
        self._blocks = weight if self.matmul.kernel == "torch" else None

    @property
    def weight_blocks(self) -> BlockWeight:
        """The layer's blocks (to fuse layers, or to check them)."""
        return self._blocks if self._blocks is not None else self.matmul.blocks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def release(self) -> int:
        """Drop the layer's blocks, for a model whose steps all run elsewhere (decoder_step.c keeps
        its own fused copies); returns the bytes freed. The layer then refuses to run."""
        freed = sum(t.nbytes for t in vars(self.matmul).values() if isinstance(t, torch.Tensor))
        self.matmul = _Released(self.matmul.kernel, self.matmul.activations)
        self._blocks = None
        return freed

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.format}, "
            f"{self.matmul.activations} activations, bias={self.bias is not None}"
        )


def _unpermute_rows(weight: BlockWeight, heads: int) -> BlockWeight:
    """Undo llama.cpp's rotary row permutation of q/k (as transformers does when it loads GGUF)."""

    def unpermute(t: torch.Tensor) -> torch.Tensor:
        rows = t.shape[0]
        return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    return map_tensors(weight, unpermute)


def map_tensors(weight: BlockWeight, change: Callable[[torch.Tensor], torch.Tensor]) -> BlockWeight:
    """The weight with `change` applied to each of its tensors (codes, scales, minimums)."""
    changed = {
        f.name: change(t) for f in dataclasses.fields(weight) if (t := getattr(weight, f.name)) is not None
    }
    return dataclasses.replace(weight, **changed)


def can_run(weight: BlockWeight) -> bool:
    """Whether a kernel here takes these blocks: Q4 ones always (torch's int4 kernel without C),
    8-bit ones on the C kernels, for a multiple of 16 outputs (with a minimum or in groups of 16,
    on builds that have q8_matmul_groups)."""
    if isinstance(weight, Q4Weight):
        return True
    grouped = weight.minimum is not None or weight.group != GROUP
    return (
        ops.available()
        and not weight.shape[0] % ops.TILE
        and weight.group in (16, GROUP)
        and (not grouped or ops.grouped_blocks())
    )


def swap_in_block_linears(model: Any, weights: dict[str, BlockWeight], activations: str = "auto") -> int:
    """Replace the named nn.Linear layers by BlockLinear; return how many were replaced.

    Q8_0 layers only where the native kernel takes them (torch has none): others stay dense.
    `activations` as for Q4Matmul.
    """
    replaced = 0
    for module_name, weight in weights.items():
        if not can_run(weight):
            continue  # no kernel takes it: it stays dense
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        current = getattr(parent, attr, None)
        if isinstance(current, nn.Linear) and (current.out_features, current.in_features) == weight.shape:
            setattr(parent, attr, BlockLinear(weight, activations, bias=current.bias))
            replaced += 1
    return replaced
