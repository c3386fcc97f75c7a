"""The kernel builds: the best one this CPU runs is picked, each computes the same, none aborts."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import torch

from tests.models import quantize_q4_1
from tokenwire.service.kernels import ops
from tokenwire.service.model.attention import keys_in_order, native_decode_attention
from tokenwire.service.model.quantized import Q4Matmul

X86 = platform.machine().lower() in ("x86_64", "amd64")
BY_LEVEL = {3: "avx512_vnni", 2: "avx512", 1: "avx2", 0: "portable"}
FORCED = os.environ.get("TOKENWIRE_KERNELS", "")  # the sanitizer run forces its build


def build_name(module: object) -> str:
    return str(getattr(module, "__name__", "")).rsplit("._", 1)[1]


def test_the_best_build_this_cpu_runs_is_in_use() -> None:
    level = ops.cpu_level()
    assert ops.build() == (FORCED or (BY_LEVEL[level] if X86 else "portable"))
    if X86:  # what a CPU of each lower level would get: the builds are all here
        for lower in range(level + 1):
            assert build_name(ops.pick_build(lower, forced="")) == BY_LEVEL[lower]


@pytest.mark.skipif(not X86, reason="one portable build off x86-64")
def test_a_build_the_cpu_cannot_run_is_refused_not_loaded() -> None:
    with pytest.raises(ops.NotBuilt, match="instructions this CPU lacks"):
        ops.pick_build(0, forced="avx512_vnni")
    with pytest.raises(ops.NotBuilt, match="compiled at set-up"):
        ops.pick_build(3, forced="no-such-build")


def runnable_builds() -> list[str]:
    level = ops.cpu_level()
    return [name for lower, name in BY_LEVEL.items() if lower <= level] if X86 else ["portable"]


@pytest.mark.parametrize("build", runnable_builds())
def test_every_build_this_cpu_runs_multiplies_as_torch_does(
    build: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = ops.pick_build(forced=build)
    monkeypatch.setattr(ops, "_load", lambda: module)
    weight = quantize_q4_1(torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) * 0.05)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    layer = Q4Matmul(weight, "native", "float32")
    assert layer.kernel == "native"
    assert torch.allclose(layer(x), x @ weight.dequantize().T, atol=1e-5)
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(3))
    out = np.empty(3, dtype=np.int64)
    ops.argmax_rows(logits, out)
    assert out.tolist() == logits.argmax(dim=-1).tolist()


def attention_inputs(rows: int = 3, heads: int = 4, kv_heads: int = 2, dim: int = 64, max_len: int = 64):
    g = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(rows, h, 1, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    caches = [torch.zeros(rows, kv_heads, max_len, dim) for _ in range(2)]
    return query, key, value, caches


def test_a_failed_allocation_fails_the_call_and_the_next_call_succeeds() -> None:
    query, key, value, (keys, values) = attention_inputs()
    positions = torch.tensor([0, 5, 63])
    expected = native_decode_attention(query, key, value, keys.clone(), values.clone(), positions, None)
    ops.fail_allocation(0)  # the next one
    try:
        with pytest.raises(ops.KernelError, match="out of memory"):
            native_decode_attention(query, key, value, keys, values, positions, None)
    finally:
        ops.fail_allocation(-1)
    again = native_decode_attention(query, key, value, keys, values, positions, None)
    assert torch.equal(again, expected)


def test_a_position_outside_the_cache_is_refused_before_anything_is_written() -> None:
    query, key, value, (keys, values) = attention_inputs()
    for positions in (torch.tensor([0, 64, 1]), torch.tensor([-1, 0, 1])):
        with pytest.raises(ops.KernelError, match="bad argument"):
            native_decode_attention(query, key, value, keys, values, positions, None)
        assert not keys.any() and not values.any()
    with pytest.raises(ops.KernelError, match="bad argument"):  # a slot past the cache's 3 rows
        native_decode_attention(
            query, key, value, keys, values, torch.tensor([0, 1, 2]), None, torch.tensor([0, 1, 3])
        )
    ordered = keys_in_order(keys)
    assert not ordered.any()
