"""The KV cache sized by a memory budget: the context follows from it, and a budget that cannot
hold even a short context is refused before anything is allocated."""

from __future__ import annotations

import pytest

from tests.models import tiny_model, tokenizer
from tokenwire.service.model.kv_budget import (
    MIN_CONTEXT,
    KVBudgetError,
    KVSize,
    bytes_per_token,
    fit_context,
)
from tokenwire.service.model.runner import ModelRunner

MIB = 2**20
GEMMA = bytes_per_token(layers=18, kv_heads=1, head_dim=256, element_bytes=4)  # Gemma 3 270M, float32
SMOLLM2 = bytes_per_token(layers=30, kv_heads=3, head_dim=64, element_bytes=2)  # float16 cache


def test_bytes_per_token() -> None:
    assert GEMMA == 36 * 1024 and SMOLLM2 == 22.5 * 1024


@pytest.mark.parametrize(
    ("wanted", "rows", "per_token", "budget", "context"),
    [
        (32768, 16, GEMMA, None, 32768),  # no budget: the model's
        (8192, 16, SMOLLM2, 3072 * MIB, 8192),  # the default budget keeps the default model's context
        (32768, 16, GEMMA, 3072 * MIB, 5440),  # Gemma 3 at default flags: 3,060 MiB at most
        (32768, 4, GEMMA, 3072 * MIB, 21824),  # fewer rows, longer context
        (32768, 16, GEMMA, 16 * 256 * GEMMA, 256),  # exactly the shortest
        (100, 16, GEMMA, 16 * 128 * GEMMA, 100),  # a model's context under a whole block fits whole
        (1000, 2, 1000, 2 * 1024 * 1000, 1000),  # rounded up to whole blocks (1,024), which fit
        (1000, 2, 1000, 2 * 1023 * 1000, 960),  # they do not: whole blocks below
    ],
)
def test_the_context_follows_from_the_budget(
    wanted: int, rows: int, per_token: int, budget: int | None, context: int
) -> None:
    size = fit_context(wanted, rows, per_token, budget)
    assert size == KVSize(context, rows, per_token)
    assert budget is None or size.nbytes <= budget


def test_a_budget_that_holds_no_short_context_is_refused_naming_the_flag() -> None:
    with pytest.raises(KVBudgetError) as refused:
        fit_context(32768, 16, GEMMA, 64 * MIB)
    assert str(refused.value) == (
        "the KV cache budget (--kv-cache-mib 64) holds 64 tokens per sequence for 16 sequences at once "
        f"(36.0 KiB a token); a context of {MIN_CONTEXT} tokens needs --kv-cache-mib 144 at least, or a "
        "smaller --max-batch-size"
    )


def test_the_runner_sizes_its_cache_by_the_budget() -> None:
    model = tiny_model()  # 2 layers, 2 KV heads of 16: 512 bytes a token in float32
    per_token = bytes_per_token(2, 2, 16, 4)
    runner = ModelRunner(
        model, tokenizer(), name="t", source="m", max_batch_size=4, kv_cache_bytes=4 * 300 * per_token
    )
    assert runner.context_length == 256  # of the model's 512
    keys = runner._attention.keys
    assert tuple(keys.shape) == (2, 4, 2, 256, 16) and 2 * keys.nbytes <= 4 * 300 * per_token
    unbounded = ModelRunner(
        tiny_model(), tokenizer(), name="t", source="m", max_batch_size=4, kv_cache_bytes=None
    )
    assert unbounded.context_length == 512
    with pytest.raises(KVBudgetError, match="--kv-cache-mib"):
        ModelRunner(
            tiny_model(),
            tokenizer(),
            name="t",
            source="m",
            max_batch_size=4,
            kv_cache_bytes=4 * 100 * per_token,
        )
