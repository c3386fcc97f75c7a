"""How long a context the KV cache's memory budget allows: the cache is one preallocated
`[layers, rows, kv_heads, positions, head_dim]` tensor for keys and one for values, so its size is
rows x positions x bytes per token, and the positions follow from the budget (--kv-cache-mib).

The tensors are allocated with torch.empty and their pages are committed only as positions are
written, so the budget is the most the cache can come to when every row is full, not what it
takes at start. Sliding-window layers still keep every position (a ring buffer of their window
would take less): see attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_KV_CACHE_MIB = 3072
# The shortest context worth serving: below it the budget is refused at start.
MIN_CONTEXT = 256
POSITION_STEP = 64  # attention.ATTENTION_BLOCK: the cache's positions come in whole blocks


class KVBudgetError(ValueError):
    """The KV cache budget cannot hold even a short context for every row (refused at start)."""


@dataclass(frozen=True)
class KVSize:
    """The cache a runner allocates: `rows` sequences of `context_length` positions."""

    context_length: int
    rows: int
    bytes_per_token: int  # one sequence's keys and values of one position, every layer

    @property
    def nbytes(self) -> int:
        positions = -(-self.context_length // POSITION_STEP) * POSITION_STEP
        return self.rows * positions * self.bytes_per_token


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """Keys and values of one position of one sequence, in every layer."""
    return 2 * layers * kv_heads * head_dim * element_bytes


def fit_context(wanted: int, rows: int, per_token: int, budget: int | None) -> KVSize:
    """The longest context up to `wanted` whose cache for `rows` sequences fits in `budget` bytes
    (None: no budget). Raises KVBudgetError when even min(MIN_CONTEXT, wanted) does not fit."""
    if budget is None or KVSize(wanted, rows, per_token).nbytes <= budget:
        return KVSize(wanted, rows, per_token)
    fits = budget // (rows * per_token) // POSITION_STEP * POSITION_STEP
    needed = min(MIN_CONTEXT, wanted)
    if fits < needed:
        need_mib = -(-KVSize(needed, rows, per_token).nbytes // 2**20)
        raise KVBudgetError(
            f"the KV cache budget ({_mib(budget)}) holds {fits} tokens per sequence for "
            f"{rows} sequences at once ({per_token / 1024:.1f} KiB a token); a context of "
            f"{needed} tokens needs --kv-cache-mib {need_mib} at least, or a smaller --max-batch-size"
        )
    return KVSize(fits, rows, per_token)


def _mib(nbytes: int) -> str:
    return f"--kv-cache-mib {nbytes / 2**20:g}"
