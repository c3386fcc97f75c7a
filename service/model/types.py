"""What a model runner takes and returns, as plain types: no torch, so the engine can use them too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class NotServable(Exception):
    """The model, as this server was started, cannot serve the request (no chat template, say): the
    request itself may be fine, on a server configured for it. The engine answers FAILED_PRECONDITION."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 means greedy (top_k/top_p/min_p then do not matter)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class PrefillChunk:
    """Part of one sequence's prompt. `last` marks the prompt's end: a first token is sampled then."""

    seq_id: int
    token_ids: Sequence[int]
    last: bool


@dataclass(frozen=True)
class TokenSample:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PrefixCache:
    """The saved KV cache of a token prefix (for sessions). `payload` is the runner's own."""

    length: int
    payload: Any
    nbytes: int
