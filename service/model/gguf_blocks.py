"""A GGUF tensor's bytes read into the block layouts the kernels run (quantized.py), type by type.

Each reader gives the weights the `gguf` package's dequantization gives, bit for bit, as codes with
a scale (and a minimum) per group: Q4_0, Q4_1 and Q4_K into Q4Weight; Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
Q5_K, Q6_K, IQ4_NL and IQ4_XS into Q8Weight (quantized.py's docstring argues each exact;
tests/model/test_gguf_blocks.py checks them against gguf.quants.dequantize). The layouts follow
gguf-py's quants.py, which follows ggml-quants.c. Other types (the IQ types below 4 bits, TQ) have
no reader: their tensors are unpacked to float32 at load.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tokenwire.service.model.quantized import BlockWeight, Q4Weight, Q8Weight

_K = 256  # values per K-quant super-block


def _blocks(data: np.ndarray, shape: tuple[int, int], values: int, size: int) -> np.ndarray:
    """[blocks, size] bytes, a row's blocks after one another."""
    out, inp = shape
    if inp % values:
        raise ValueError(f"a row of {inp} values is not whole blocks of {values}")
    return np.ascontiguousarray(data).view(np.uint8).reshape(out * inp // values, size)


def _half(raw: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n, 1] float32 (float16 in the file)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: the low nibbles are values 0..15, the high ones 16..31."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _fifth_bits(raw: np.ndarray) -> np.ndarray:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32]: bit i, as value i's fifth bit."""
    high = np.ascontiguousarray(raw).view(np.uint32) >> np.arange(32, dtype=np.uint32)
    return ((high & 1).astype(np.uint8)) << 4


def _q4(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, shape: tuple[int, int]) -> Q4Weight:
    out, inp = shape
    return Q4Weight(
        torch.from_numpy(codes.astype(np.uint8).reshape(out, inp)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(out, -1)),
        torch.from_numpy(np.ascontiguousarray(minimum, dtype=np.float32).reshape(out, -1)),
    )


def _q8(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None, shape: tuple[int, int]) -> Q8Weight:
    out, inp = shape
    return Q8Weight(
        torch.from_numpy(codes.astype(np.int8).reshape(out, inp)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(out, -1)),
        None
        if minimum is None
        else torch.from_numpy(np.ascontiguousarray(minimum, dtype=np.float32).reshape(out, -1)),
    )


def read_q4_0(data: np.ndarray, shape: tuple[int, int]) -> Q4Weight:
    """w = d * (q - 8): scale d, minimum -8d (exact: a power of two times d)."""
    b = _blocks(data, shape, 32, 18)
    d = _half(b[:, 0:2])
    return _q4(_nibbles(b[:, 2:18]), d, -8 * d, shape)


def read_q4_1(data: np.ndarray, shape: tuple[int, int]) -> Q4Weight:
    """w = d * q + m."""
    b = _blocks(data, shape, 32, 20)
    return _q4(_nibbles(b[:, 4:20]), _half(b[:, 0:2]), _half(b[:, 2:4]), shape)


def read_q5_0(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """w = d * (q - 16), q of 5 bits: 8-bit codes q - 16."""
    b = _blocks(data, shape, 32, 22)
    q = _nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6])
    return _q8(q.astype(np.int16) - 16, _half(b[:, 0:2]), None, shape)


def read_q5_1(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """w = d * q + m, q of 5 bits."""
    b = _blocks(data, shape, 32, 24)
    q = _nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8])
    return _q8(q, _half(b[:, 0:2]), _half(b[:, 2:4]), shape)


def read_q8_0(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """w = d * q, q signed 8 bits."""
    b = _blocks(data, shape, 32, 34)
    return _q8(b[:, 2:34].view(np.int8), _half(b[:, 0:2]), None, shape)


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> the 8 sub-blocks' 6-bit scales and minimums (gguf's get_scale_min)."""
    scales = raw.reshape(-1, 3, 4)
    d, m, m_d = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mins.astype(np.float32)


def read_q4_k(data: np.ndarray, shape: tuple[int, int]) -> Q4Weight:
    """Super-blocks of 256: w = (d*sc) * q - dmin*m per sub-block of 32 (products exact in float32)."""
    b = _blocks(data, shape, _K, 144)
    sc, mins = _k_scales(b[:, 4:16])
    scale, minimum = _half(b[:, 0:2]) * sc, _half(b[:, 2:4]) * mins
    # 4 runs of 32 bytes: low nibbles are sub-block 2j, high ones 2j + 1
    qs = b[:, 16:144].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return _q4(qs & 0x0F, scale, -minimum, shape)


def read_q5_k(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """As Q4_K with a fifth bit per value: codes 0..31 with a minimum."""
    b = _blocks(data, shape, _K, 176)
    sc, mins = _k_scales(b[:, 4:16])
    scale, minimum = _half(b[:, 0:2]) * sc, _half(b[:, 2:4]) * mins
    low = b[:, 48:176].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    high = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = (low & 0x0F).reshape(-1, 8, 32) | ((high & 1) << 4)
    return _q8(q, scale, -minimum, shape)


def read_q6_k(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """Super-blocks of 256: w = (d*sc) * (q - 32) per sub-block of 16, sc a signed byte: codes q - 32,
    groups of 16 (d*sc exact in float32)."""
    b = _blocks(data, shape, _K, 210)
    low = b[:, 0:128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    high = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (low & 0x0F).reshape(-1, 8, 32) | ((high & 0x03).reshape(-1, 8, 32) << 4)
    scale = _half(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
    return _q8(q.astype(np.int16) - 32, scale, None, shape)


def read_q2_k(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """Super-blocks of 256: w = (d*sc) * q - dmin*m per sub-block of 16, q of 2 bits, sc and m of 4:
    codes 0..3 in groups of 16 with a minimum (-dmin*m: adding it subtracts dmin*m exactly)."""
    b = _blocks(data, shape, _K, 84)
    d, dmin = _half(b[:, 80:82]), _half(b[:, 82:84])
    scale = d * (b[:, 0:16] & 0x0F).astype(np.float32)
    minimum = -(dmin * (b[:, 0:16] >> 4).astype(np.float32))
    # 2 runs of 32 bytes, each holding 4 runs of 32 values (bits 0-1, 2-3, 4-5, 6-7)
    q = b[:, 16:80].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return _q8((q & 0x03).reshape(-1, _K), scale, minimum, shape)


def read_q3_k(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """Super-blocks of 256: w = (d * (sc - 32)) * q per sub-block of 16, sc of 6 bits, q of 3 (two low
    bits, less 4 where the high bit in hmask is clear): codes -4..3 in groups of 16."""
    b = _blocks(data, shape, _K, 110)
    raw = b[:, 96:108]  # 16 scales: low nibbles of bytes 0-7, then their high ones; 2 bits more each
    low = (raw[:, 0:8].reshape(-1, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(-1, 16)
    high = raw[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    sc = ((low & 0x0F) | ((high.reshape(-1, 16) & 0x03) << 4)).astype(np.int8) - np.int8(32)
    scale = _half(b[:, 108:110]) * sc.astype(np.float32)
    ql = b[:, 32:96].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = b[:, 0:32].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = (ql.reshape(-1, _K) & 0x03).astype(np.int16) - (((qh.reshape(-1, _K) & 1) ^ 1) << 2).astype(np.int16)
    return _q8(q, scale, None, shape)


# IQ4_NL's and IQ4_XS's 16 values, which a 4-bit index picks (ggml's kvalues_iq4nl)
_IQ4_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)


def read_iq4_nl(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """w = d * v[q], v a fixed table of 16 signed bytes: 8-bit codes v[q] (twice the file's bits, on
    the kernels the other 8-bit types use)."""
    b = _blocks(data, shape, 32, 18)
    return _q8(_IQ4_VALUES[_nibbles(b[:, 2:18])], _half(b[:, 0:2]), None, shape)


def read_iq4_xs(data: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """Super-blocks of 256: w = (d * (ls - 32)) * v[q] per sub-block of 32, ls of 6 bits (4 low bits
    in scales_l's nibbles, 2 high in scales_h); codes v[q] as IQ4_NL's."""
    b = _blocks(data, shape, _K, 136)
    low = (b[:, 4:8].reshape(-1, 4, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)).reshape(
        -1, 8
    ) & 0x0F
    high_bits = np.ascontiguousarray(b[:, 2:4]).view(np.uint16) >> (2 * np.arange(8, dtype=np.uint16))
    high = high_bits.astype(np.uint8) & 0x03
    ls = (low | (high << 4)).astype(np.int8) - np.int8(32)
    scale = _half(b[:, 0:2]) * ls.astype(np.float32)
    q = _nibbles(b[:, 8:136].reshape(-1, 16)).reshape(-1, _K)
    return _q8(_IQ4_VALUES[q], scale, None, shape)


# ggml type id (gguf.GGMLQuantizationType) -> reader
READERS: dict[int, Callable[[np.ndarray, tuple[int, int]], BlockWeight]] = {
    2: read_q4_0,
    3: read_q4_1,
    6: read_q5_0,
    7: read_q5_1,
    8: read_q8_0,
    10: read_q2_k,
    11: read_q3_k,
    12: read_q4_k,
    13: read_q5_k,
    14: read_q6_k,
    20: read_iq4_nl,
    23: read_iq4_xs,
}
