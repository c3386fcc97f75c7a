"""Q4_1 and Q8_0 layers: blocks read exactly, the kernels batch-invariant, the real file's layers found."""

from __future__ import annotations

import threading

import gguf
import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from tests.models import default_model, quantize_q4_1, quantize_q8_0, runner_and_reference
from tokenwire.service.kernels import ops
from tokenwire.service.model.attention import (
    decode_attention,
    keys_in_order,
    native_decode_attention,
    prefill_attention,
)
from tokenwire.service.model.gguf_blocks import read_q4_1, read_q8_0
from tokenwire.service.model.quantized import (
    BlockLinear,
    Q4Matmul,
    Q4Weight,
    Q8Matmul,
    Q8Weight,
    _unpermute_rows,
    block_matmul,
    swap_in_block_linears,
)

# The C kernels are always here (tests/conftest.py fails the run without them); what differs between
# machines is the CPU, and with it the build that runs (kernels/ops.py).
needs_int8 = pytest.mark.skipif(not ops.int8_activations(), reason="this CPU lacks AVX512-VNNI")
# (kernel, activations): the C kernels on 8-bit or float32 activations; torch's int4 kernel (bfloat16)
KERNELS = [
    pytest.param(("native", "int8"), marks=needs_int8, id="int8"),
    pytest.param(("native", "float32"), id="float32"),
    pytest.param(("torch", "auto"), id="torch"),
]
C_ACTIVATIONS = [pytest.param("int8", marks=needs_int8), "float32"]


def random_weight(out: int, inp: int, seed: int) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_blocks_read_as_gguf_dequantizes_them() -> None:
    dense = random_weight(96, 128, 0).numpy()
    data = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q4_1)
    expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1)
    weight = read_q4_1(data, (96, 128))
    assert weight.codes.dtype == torch.uint8 and int(weight.codes.max()) <= 15
    assert np.array_equal(weight.dequantize().numpy(), expected)
    data = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
    weight_q8 = read_q8_0(data, (96, 128))
    assert weight_q8.codes.dtype == torch.int8 and int(weight_q8.codes.min()) < 0
    assert np.array_equal(weight_q8.dequantize().numpy(), expected)


def test_unpermuting_rows_matches_transformers_for_q_and_k() -> None:
    dense = random_weight(64, 64, 1)
    weight = quantize_q4_1(dense)
    reference = LlamaTensorProcessor()._reverse_permute_weights(weight.dequantize().numpy(), 4, 2)
    assert np.array_equal(_unpermute_rows(weight, 2).dequantize().numpy(), reference)


def test_without_the_c_kernel_the_torch_kernel_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_NATIVE", "0")
    assert ops._load.__wrapped__() is None
    monkeypatch.setattr(ops, "_load", ops._load.__wrapped__)
    assert Q4Matmul(quantize_q4_1(random_weight(32, 64, 0))).kernel == "torch"


def rounded_to_8_bits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block_matmul_int8.c's rounding, per row and block of 32: (codes, scales) as float64."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse)  # float32, half to even, as the kernel
    return codes.double(), (amax / 127.0).double()


def int8_reference(x: torch.Tensor, weight: Q4Weight | Q8Weight) -> torch.Tensor:
    """What the 8-bit kernels compute, in float64: the rounded activations times the exact weights."""
    codes, scales = rounded_to_8_bits(x)
    dense = weight.dequantize().double().view(weight.shape[0], -1, 32)
    return torch.einsum("rgk,ngk->rn", codes * scales, dense).float()


@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_is_close_to_the_dense_weights(kernel: tuple[str, str]) -> None:
    weight = quantize_q4_1(random_weight(256, 576, 2))
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(3))
    expected = x @ weight.dequantize().T
    matmul = Q4Matmul(weight, *kernel)
    out = matmul(x)
    assert out.dtype == torch.float32 and out.shape == (5, 256)
    error = float((out - expected).norm() / expected.norm())
    if matmul.activations == "float32":  # float32 throughout: only the summation order differs
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    elif matmul.activations == "int8":  # ~2.5 significant digits, and exactly the rounding it says
        assert 1e-3 < error < 1e-2
        assert torch.allclose(out, int8_reference(x, weight), rtol=1e-5, atol=1e-5)
    else:  # bfloat16 inputs: ~3 significant digits
        assert matmul.activations == "bfloat16"
        assert torch.allclose(out, expected, rtol=0.02, atol=0.02 * float(expected.abs().mean()))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_gives_the_same_bits_in_any_batch_and_fused_with_other_weights(kernel: tuple[str, str]) -> None:
    a, b = quantize_q4_1(random_weight(192, 576, 4)), quantize_q4_1(random_weight(320, 576, 5))
    x = torch.randn(300, 1, 576, generator=torch.Generator().manual_seed(6))
    matmul = Q4Matmul(a, *kernel)
    alone = torch.cat([matmul(x[i : i + 1]) for i in range(len(x))])
    # every remainder of the C kernels' 8- and 16-row blocks, and their 64- and 128-row panels
    for rows in (*range(2, 34), 40, 64, 65, 100, 128, 129, 300):
        assert torch.equal(matmul(x[:rows]), alone[:rows]), rows
    fused = Q4Matmul(Q4Weight.concat([a, b]), *kernel)(x)
    assert torch.equal(fused[..., :192], alone)
    assert torch.equal(fused[..., 192:], Q4Matmul(b, *kernel)(x))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_nan_or_inf_in_a_row_reaches_its_outputs_and_no_other_row(kernel: tuple[str, str]) -> None:
    matmul = Q4Matmul(quantize_q4_1(random_weight(64, 128, 14)), *kernel)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(15))
    x[1, 40], x[2, 100] = float("nan"), float("inf")
    out = matmul(x)
    assert not out[1].isfinite().any() and not out[2].isfinite().any()
    assert out[[0, 3]].isfinite().all()


@pytest.mark.parametrize("activations", C_ACTIVATIONS)
def test_native_layers_keep_only_the_kernel_layout_and_unpack_to_the_same_blocks(activations: str) -> None:
    q4, q8 = quantize_q4_1(random_weight(48, 96, 12)), quantize_q8_0(random_weight(32, 64, 13))
    for weight in (q4, q8):
        layer = BlockLinear(weight, activations)
        assert layer.matmul.activations == activations
        assert layer._blocks is None  # no second copy of the codes
        unpacked = layer.weight_blocks
        assert type(unpacked) is type(weight)
        for name in ("codes", "scale", "minimum"):  # Q8_0 has no minimum (None)
            expected, got = getattr(weight, name, None), getattr(unpacked, name, None)
            assert got is expected is None or torch.equal(got, expected), name
    assert BlockLinear(q4).format == "q4_1" and BlockLinear(q8).format == "q8_0"


@pytest.mark.parametrize("activations", C_ACTIVATIONS)
def test_q8_0_blocks_multiply_as_documented_and_batch_invariantly(activations: str) -> None:
    a, b = quantize_q8_0(random_weight(176, 576, 7)), quantize_q8_0(random_weight(64, 576, 8))
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(9))
    x[3, 32:64] = 0  # a block of zeros: scale 0, no division by it
    matmul = Q8Matmul(a, activations)
    alone = torch.cat([matmul(x[i : i + 1]) for i in range(len(x))])
    expected = x @ a.dequantize().T if activations == "float32" else int8_reference(x, a)
    assert torch.allclose(alone, expected, rtol=1e-5, atol=1e-5)
    for rows in (*range(2, 34), 40):
        assert torch.equal(matmul(x[:rows]), alone[:rows]), rows
    fused = block_matmul(Q8Weight.concat([a, b]), activations)(x)
    assert torch.equal(fused[:, :176], alone)
    assert torch.equal(fused[:, 176:], Q8Matmul(b, activations)(x))


@pytest.mark.parametrize("activations", C_ACTIVATIONS)
def test_the_c_kernels_give_the_same_bits_on_any_thread_count_and_from_concurrent_callers(
    activations: str,
) -> None:
    matmul = Q4Matmul(quantize_q4_1(random_weight(3072, 576, 10)), "native", activations)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(11))
    expected = matmul(x)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)  # what cpu_threads.py does on a busy machine
            assert torch.equal(matmul(x), expected), count
    finally:
        torch.set_num_threads(threads)
    # Two callers at once: one gets the helper threads, the other runs alone; both must be right.
    results: list[bool] = []

    def call() -> None:
        results.extend(torch.equal(matmul(x), expected) for _ in range(50))

    callers = [threading.Thread(target=call) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert results == [True] * 150


def test_layers_no_kernel_takes_stay_dense() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 40, bias=False), torch.nn.Linear(64, 48, bias=False))
    weights = {"0": quantize_q8_0(model[0].weight), "1": quantize_q8_0(model[1].weight)}
    # 40 outputs are not whole 16-column tiles; torch has no Q8_0 kernel at all
    assert swap_in_block_linears(model, weights) == 1
    assert isinstance(model[0], torch.nn.Linear)
    assert isinstance(model[1], BlockLinear)


def test_decode_attention_is_padding_invariant_and_matches_sdpa() -> None:
    g = torch.Generator().manual_seed(7)
    rows, heads, kv_heads, dim, longest = 6, 9, 3, 64, 400
    query = torch.randn(rows, heads, 1, dim, generator=g)
    keys = torch.randn(rows, kv_heads, longest, dim, generator=g)
    values = torch.randn(rows, kv_heads, longest, dim, generator=g)
    for length in (1, 2, 3, 15, 16, 17, 63, 64, 65, 200, 333):
        alone = decode_attention(query[:1], keys[:1, :, :length], values[:1, :, :length], None)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            query[:1], keys[:1, :, :length], values[:1, :, :length], enable_gqa=True
        )
        assert torch.allclose(alone, sdpa, atol=1e-5)
        for padded in (length + 1, length + 50, longest):
            lengths = torch.tensor([length] + [padded] * (rows - 1))
            mask = (torch.arange(padded)[None, :] < lengths[:, None])[:, None, None, :]
            batched = decode_attention(query, keys[:, :, :padded], values[:, :, :padded], mask)
            assert torch.equal(batched[:1], alone), (length, padded)


needs_half_cache = pytest.mark.skipif(not ops.half_kv_cache(), reason="this CPU lacks AVX-512")


@pytest.mark.parametrize("dim", [16, 64, 80, 128, 256])  # 64, 128: compiled for their size
@pytest.mark.parametrize("cache_dtype", [torch.float32, pytest.param(torch.float16, marks=needs_half_cache)])
def test_the_c_decode_attention_writes_the_new_key_and_is_batch_invariant(
    dim: int, cache_dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(8)
    rows, heads, kv_heads, max_len = 5, 9, 3, 400
    # q, k and v as the decoder hands them over: strided views of one projection output
    qkv = torch.randn(rows, 1, (heads + 2 * kv_heads) * dim, generator=g)
    query = qkv[..., : heads * dim].view(rows, 1, heads, dim).transpose(1, 2)
    key = qkv[..., heads * dim : (heads + kv_heads) * dim].view(rows, 1, kv_heads, dim).transpose(1, 2)
    value = qkv[..., (heads + kv_heads) * dim :].view(rows, 1, kv_heads, dim).transpose(1, 2)
    cache = [torch.randn(rows, kv_heads, max_len, dim, generator=g).to(cache_dtype) for _ in range(2)]
    for length in (1, 2, 15, 16, 17, 31, 64, 65, 200, 333):
        positions = torch.tensor([length - 1, 0, 399, 16, length])
        keys, values = (c.clone() for c in cache)
        out = native_decode_attention(query, key, value, keys, values, positions, None)
        assert out.shape == (rows, heads, 1, dim)
        ordered = keys_in_order(keys)
        for row, at in enumerate(positions.tolist()):
            # written as the cache keeps them (float16: rounded to nearest)
            assert torch.equal(ordered[row, :, at], key[row, :, 0].to(cache_dtype))
            assert torch.equal(values[row, :, at], value[row, :, 0].to(cache_dtype))
            sdpa = torch.nn.functional.scaled_dot_product_attention(
                query[row : row + 1],
                ordered[row : row + 1, :, : at + 1].float(),
                values[row : row + 1, :, : at + 1].float(),
                enable_gqa=True,
            )
            assert torch.allclose(out[row], sdpa[0], atol=2e-6), (length, row)
        alone = native_decode_attention(query[:1], key[:1], value[:1], keys, values, positions[:1], None)
        assert torch.equal(alone[0], out[0]), length


@pytest.mark.skipif(not ops.available(), reason="no C kernels")
@pytest.mark.parametrize("dim", [16, 64, 256])
@pytest.mark.parametrize("cache_dtype", [torch.float32, pytest.param(torch.float16, marks=needs_half_cache)])
def test_the_c_decode_attention_reads_only_a_windows_keys(dim: int, cache_dtype: torch.dtype) -> None:
    """A sliding window (transformers': key > query - window) starting anywhere in a block of 16
    keys, as SDPA over just those keys; batch-invariant; a prefill's rows (slots) see their own."""
    g = torch.Generator().manual_seed(9)
    rows, heads, kv_heads, max_len = 6, 4, 2, 256
    query = torch.randn(rows, heads, 1, dim, generator=g)
    key = torch.randn(rows, kv_heads, 1, dim, generator=g)
    value = torch.randn(rows, kv_heads, 1, dim, generator=g)
    cache = [torch.randn(rows, kv_heads, max_len, dim, generator=g).to(cache_dtype) for _ in range(2)]
    for window in (1, 5, 16, 17, 40, 255):
        positions = torch.tensor([100, 3, 16, 31, 0, 255])
        keys, values = (c.clone() for c in cache)
        out = native_decode_attention(query, key, value, keys, values, positions, None, window=window)
        ordered = keys_in_order(keys)
        for row, at in enumerate(positions.tolist()):
            first = max(0, at + 1 - window)
            sdpa = torch.nn.functional.scaled_dot_product_attention(
                query[row : row + 1],
                ordered[row : row + 1, :, first : at + 1].float(),
                values[row : row + 1, :, first : at + 1].float(),
                enable_gqa=True,
            )
            assert torch.allclose(out[row], sdpa[0], atol=2e-6), (window, row)
        alone = native_decode_attention(
            query[:1], key[:1], value[:1], keys, values, positions[:1], None, window=window
        )
        assert torch.equal(alone[0], out[0]), window
        # a prefill: six tokens of one prompt in slot 0, each over its own window of that slot
        keys, values = (c.clone() for c in cache)
        at = torch.arange(250, 256)
        slots = torch.zeros(rows, dtype=torch.int64)
        prefill = native_decode_attention(query, key, value, keys, values, at, None, slots, window)
        ordered = keys_in_order(keys)
        for row, end in enumerate(at.tolist()):
            first = max(0, end + 1 - window)
            sdpa = torch.nn.functional.scaled_dot_product_attention(
                query[row : row + 1],
                ordered[:1, :, first : end + 1].float(),
                values[:1, :, first : end + 1].float(),
                enable_gqa=True,
            )
            assert torch.allclose(prefill[row], sdpa[0], atol=2e-6), (window, row)


@pytest.mark.skipif(not ops.available(), reason="no C kernels")
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("cache_dtype", [torch.float32, pytest.param(torch.float16, marks=needs_half_cache)])
def test_the_c_decode_attention_soft_caps_its_scores(window: int | None, cache_dtype: torch.dtype) -> None:
    """Gemma 2's soft cap (scores -> cap * tanh(scores / cap), before the mask) as transformers'
    eager ops compute it, with and without a window; batch-invariant."""
    g = torch.Generator().manual_seed(10)
    rows, heads, kv_heads, dim, max_len, cap = 4, 4, 2, 64, 128, 1.5
    query = torch.randn(rows, heads, 1, dim, generator=g) * 2  # scores far past the cap
    key = torch.randn(rows, kv_heads, 1, dim, generator=g)
    value = torch.randn(rows, kv_heads, 1, dim, generator=g)
    cache = [torch.randn(rows, kv_heads, max_len, dim, generator=g).to(cache_dtype) for _ in range(2)]
    positions = torch.tensor([100, 3, 20, 127])
    scale = dim**-0.5
    keys, values = (c.clone() for c in cache)
    out = native_decode_attention(
        query, key, value, keys, values, positions, scale, window=window, softcap=cap
    )
    uncapped = native_decode_attention(
        query, key, value, *(c.clone() for c in cache), positions, scale, window=window
    )
    ordered = keys_in_order(keys)
    for row, at in enumerate(positions.tolist()):
        first = 0 if window is None else max(0, at + 1 - window)
        expected = prefill_attention(
            query[row : row + 1],
            ordered[row : row + 1, :, first : at + 1].float(),
            values[row : row + 1, :, first : at + 1].float(),
            torch.ones(1, at + 1 - first, dtype=torch.bool),
            scale,
            cap,
        )
        assert torch.allclose(out[row], expected[0], atol=2e-6), row
        assert not torch.allclose(out[row], uncapped[row], atol=1e-3), row  # the cap changed it
    alone = native_decode_attention(
        query[:1], key[:1], value[:1], keys, values, positions[:1], scale, window=window, softcap=cap
    )
    assert torch.equal(alone[0], out[0])


@pytest.mark.parametrize("vocab", [1, 15, 16, 49152, 49157])
def test_the_c_argmax_answers_as_numpy_does(vocab: int) -> None:
    """decoder_step.c's argmax for greedy rows: the first maximum, or the first NaN if any (numpy's
    argmax, which sampling.sample takes), whatever the width."""
    g = torch.Generator().manual_seed(vocab)
    rows = [torch.randn(vocab, generator=g) for _ in range(8)]
    rows[1][:] = -torch.inf
    rows[2][vocab // 2 :] = rows[2].max() + 1  # ties: the first one
    rows[3][vocab - 1] = torch.nan
    rows[4][vocab // 3] = torch.nan
    rows[4][vocab - 1] = torch.nan
    rows[5][:] = torch.nan
    rows[6][vocab - 1] = rows[6].max() + 1  # in the tail past whole vectors
    rows[7][0] = torch.inf
    logits = torch.stack(rows)
    out = np.empty(len(rows), dtype=np.int64)
    ops.argmax_rows(logits, out)
    assert out.tolist() == logits.numpy().argmax(axis=-1).tolist()


@pytest.mark.model
def test_the_default_model_runs_every_layer_on_its_gguf_blocks() -> None:
    model = default_model("auto")
    blocks = {name: m.weight_blocks for name, m in model.named_modules() if isinstance(m, BlockLinear)}
    q4 = [name for name, w in blocks.items() if isinstance(w, Q4Weight)]
    assert len(q4) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down: all Q4_1 in the file
    assert not any(isinstance(m, BlockLinear) for m in default_model("dense").modules())
    # The loader checked each layer against the dense unpacking; check two again end to end.
    dense = default_model("dense")
    q4_k = model.get_submodule("model.layers.3.self_attn.k_proj")
    assert torch.equal(
        q4_k.weight_blocks.dequantize(), dense.get_submodule("model.layers.3.self_attn.k_proj").weight
    )
    # the tied lm_head: the token embedding's Q8_0 blocks
    assert isinstance(blocks["lm_head"], Q8Weight)
    assert torch.equal(blocks["lm_head"].dequantize(), dense.lm_head.weight)
    runner, _ = runner_and_reference(model)
    assert runner.weights == "q4_1"  # what GetModelInfo reports
    assert q4_k.matmul.kernel == "native"
    int8 = ops.int8_activations()
    assert runner.activations == ("int8" if int8 else "float32")
    # with 8-bit activations the KV cache is float16, as llama.cpp keeps it
    assert runner.cache_dtype == (torch.float16 if int8 else torch.float32)
    assert runner.decode_kernel == "c"
