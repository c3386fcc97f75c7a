"""What the engine asks of a model runner: the torch one (model/runner.py) or a fake one in tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tokenwire.service.model.types import PrefillChunk, PrefixCache, SamplingParams, TokenSample


class Runner(Protocol):
    """The model runner as the engine uses it. Called from the step thread only."""

    name: str
    source: str
    device: Any
    dtype: Any
    weights: str  # "dense", or "q4_1" when the linear layers run on a GGUF file's 4-bit blocks
    activations: str  # what those block layers multiply ("int8", "float32", "bfloat16"); "" if dense
    cache_dtype: Any  # the KV cache's dtype
    vocab_size: int
    context_length: int
    max_batch_size: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
    bos_token_id: int | None

    @property
    def backend_tokenizer(self) -> Any: ...
    @property
    def free_rows(self) -> int: ...
    @property
    def live_sequences(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]: ...
    def token_texts(self, token_ids: Sequence[int]) -> list[str]: ...

    def add_sequence(
        self,
        seq_id: int,
        sampling: SamplingParams,
        seed: int,
        *,
        prompt_token_ids: Sequence[int] = (),
        logprobs: bool = False,
        top_n: int = 0,
    ) -> None: ...
    def remove_sequence(self, seq_id: int) -> None: ...
    def ban_tokens(self, seq_id: int, token_ids: Sequence[int]) -> None: ...
    def prefill(self, chunks: Sequence[PrefillChunk]) -> dict[int, TokenSample]: ...
    def decode(self, token_ids: dict[int, int]) -> dict[int, TokenSample]: ...
    def save_prefix(self, seq_id: int, length: int) -> PrefixCache: ...
    def load_prefix(self, seq_id: int, prefix: PrefixCache, length: int) -> None: ...
    def warm_up(self) -> None: ...
