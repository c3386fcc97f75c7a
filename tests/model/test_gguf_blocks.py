"""Every GGUF type with a reader: its blocks dequantize as the gguf package does, bit for bit, and the
C kernels multiply them as the dense weights (float32 activations) or as they say (8-bit ones)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tokenwire.service.kernels import ops
from tokenwire.service.model.gguf_blocks import READERS
from tokenwire.service.model.quantized import BlockLinear, Q4Matmul, Q4Weight, Q8Matmul, Q8Weight, fuse_blocks

Q = gguf.GGMLQuantizationType
# where each type's float16 fields sit in its block (they must be finite; every other byte is free)
HALVES = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.IQ4_NL: (0,),
    Q.IQ4_XS: (0,),
}
needs_int8 = pytest.mark.skipif(not ops.int8_activations(), reason="this CPU lacks AVX512-VNNI")


def random_tensor(kind: Q, out: int, inp: int, seed: int) -> np.ndarray:
    """A tensor's bytes: random codes and scales, the float16 fields finite (small, of both signs)."""
    values, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(out * inp // values, size), dtype=np.uint8)
    for at in HALVES[kind]:
        half = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16)
        blocks[:, at : at + 2] = half.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(out, -1)


@pytest.mark.parametrize("kind", list(HALVES), ids=lambda kind: kind.name)
def test_blocks_read_as_gguf_dequantizes_them(kind: Q) -> None:
    data = random_tensor(kind, 32, 512, 0)
    weight = READERS[kind](data, (32, 512))
    expected = gguf.quants.dequantize(data, kind)
    assert np.array_equal(weight.dequantize().numpy(), expected)
    if isinstance(weight, Q4Weight):
        assert int(weight.codes.max()) <= 15
    else:  # signed bytes, as the kernels take them
        assert weight.codes.dtype == torch.int8


def rounded_reference(x: torch.Tensor, weight: Q4Weight | Q8Weight) -> torch.Tensor:
    """What the 8-bit kernels compute, in float64: x rounded per block of 32, times the exact weights."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    rounded = (codes.double() * (amax / 127.0).double()).reshape(x.shape)
    return (rounded @ weight.dequantize().double().T).float()


@pytest.mark.parametrize("activations", [pytest.param("int8", marks=needs_int8), "float32"])
@pytest.mark.parametrize("kind", list(HALVES), ids=lambda kind: kind.name)
def test_each_type_multiplies_as_its_weights(kind: Q, activations: str) -> None:
    weight = READERS[kind](random_tensor(kind, 48, 512, 1), (48, 512))
    matmul = (
        Q4Matmul(weight, "native", activations)
        if isinstance(weight, Q4Weight)
        else Q8Matmul(weight, activations)
    )
    assert matmul.activations == activations
    x = torch.randn(19, 512, generator=torch.Generator().manual_seed(2))
    out = matmul(x)
    dense = weight.dequantize()
    expected = x @ dense.T if activations == "float32" else rounded_reference(x, weight)
    scale = float(expected.abs().max())
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * scale)
    # a row alone gives the bits it gives in the batch, and the blocks unpack as they were packed
    assert torch.equal(matmul(x[5:6]), out[5:6])
    assert torch.equal(matmul.blocks().dequantize(), dense)


@pytest.mark.parametrize("activations", [pytest.param("int8", marks=needs_int8), "float32"])
def test_layers_of_one_layout_fuse_to_the_same_bits_and_others_do_not(activations: str) -> None:
    a = BlockLinear(READERS[Q.Q6_K](random_tensor(Q.Q6_K, 32, 256, 3), (32, 256)), activations, "q6_k")
    b = BlockLinear(READERS[Q.Q6_K](random_tensor(Q.Q6_K, 64, 256, 4), (64, 256)), activations, "q6_k")
    c = BlockLinear(READERS[Q.Q5_K](random_tensor(Q.Q5_K, 32, 256, 5), (32, 256)), activations, "q5_k")
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(6))
    fused = fuse_blocks([a, b])
    assert fused is not None and torch.equal(fused(x), torch.cat([a(x), b(x)], dim=-1))
    assert fuse_blocks([a, c]) is None


@needs_int8
@pytest.mark.parametrize("kind", list(HALVES), ids=lambda kind: kind.name)
def test_the_tile_unit_gives_the_bits_of_the_vector_instructions(kind: Q) -> None:
    """Where the CPU has AMX, blocks of 16 rows take their integer sums from its tiles
    (block_matmul_int8.c): the same bits as vpdpbusd's, in a prefill's batch (240 rows: panels of
    128 and a tail of 16 that are not whole blocks) as in any other."""
    weight = READERS[kind](random_tensor(kind, 48, 512, 7), (48, 512))
    matmul = Q4Matmul(weight, "native", "int8") if isinstance(weight, Q4Weight) else Q8Matmul(weight, "int8")
    x = torch.randn(250, 512, generator=torch.Generator().manual_seed(8))
    tiles = matmul(x)
    try:
        ops.use_amx(False)
        vectors = matmul(x)
    finally:
        ops.use_amx(True)
    assert torch.equal(tiles, vectors)
    assert torch.allclose(
        tiles, rounded_reference(x, weight), rtol=1e-5, atol=1e-5 * float(tiles.abs().max())
    )
