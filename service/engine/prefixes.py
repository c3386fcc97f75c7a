"""Automatic prefix caching: the KV cache of recent requests' tokens, reused by any later request whose
prompt starts the same way, with no session needed.

Clients that keep the conversation on their side (most voice frameworks, agent libraries, the OpenAI
API) resend it every turn; a request that starts with what an earlier one computed copies that KV
instead of prefilling it again. Entries belong to their owner (principal): reuse never crosses
principals, since a faster first token would tell one caller what another had sent.

Bounded in bytes, least recently used first out, within what sessions leave of the shared budget:
sessions pin their prefixes, this cache takes the rest. Plain Python, the step thread only: the KV
payload is the runner's own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenwire.service.engine.runner import Runner
from tokenwire.service.model.types import PrefixCache


@dataclass
class _Entry:
    owner: str
    token_ids: list[int]  # the tokens whose KV `kv` holds, in order
    kv: PrefixCache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixStore:
    def __init__(self, budget: Callable[[], int], min_tokens: int) -> None:
        # Bytes this cache may hold now: the shared budget less what sessions hold.
        self.budget = budget
        # Shorter prefixes are not kept: copying them saves less than it costs.
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._ids = 0
        self.nbytes = 0
        self.hits = 0  # requests that reused a cached prefix

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, owner: str, prompt: Sequence[int]) -> tuple[int, PrefixCache | None]:
        """The longest cached prefix of `prompt` among the owner's entries: (tokens, its KV)."""
        best, found, key = 0, None, None
        for entry_id, entry in self._entries.items():
            if entry.owner != owner:
                continue
            shared = min(common_prefix(entry.token_ids, prompt), entry.kv.length)
            if shared > best:
                best, found, key = shared, entry.kv, entry_id
        if key is not None:
            self._entries.move_to_end(key)
        return best, found

    def restore(
        self, owner: str, prompt: Sequence[int], runner: Runner, seq_id: int, *, beyond: int = 0
    ) -> int:
        """Copy the longest cached prefix of the prompt into the sequence's row and return its length,
        when it is longer than `beyond` (the row's cached tokens so far); else 0, the row untouched.
        At least the prompt's last token is left to prefill (its logits start the reply)."""
        if len(prompt) <= self.min_tokens:
            return 0
        reuse, kv = self.longest(owner, prompt[:-1])
        if kv is None or reuse < self.min_tokens or reuse <= beyond:
            return 0
        runner.load_prefix(seq_id, kv, reuse)
        self.hits += 1
        return reuse

    def save(self, owner: str, token_ids: list[int], runner: Runner, seq_id: int) -> None:
        """Keep the KV of a finished request's tokens (their KV is in its row), unless a kept entry
        already covers them; entries they cover are replaced."""
        if len(token_ids) < self.min_tokens:
            return
        for entry_id, entry in list(self._entries.items()):
            if entry.owner != owner:
                continue
            shared = common_prefix(entry.token_ids, token_ids)
            if shared == len(token_ids) and entry.kv.length >= len(token_ids):
                self._entries.move_to_end(entry_id)  # nothing new: already kept
                return
            if shared == len(entry.token_ids):  # the new tokens extend this entry: it goes
                self._drop(entry_id)
        kv = runner.save_prefix(seq_id, len(token_ids))
        self._ids += 1
        self._entries[self._ids] = _Entry(owner, token_ids[: kv.length], kv)
        self.nbytes += kv.nbytes
        self.evict()

    def evict(self) -> None:
        """Drop least recently used entries until the cache fits its budget."""
        limit = self.budget()
        while self._entries and self.nbytes > limit:
            self._drop(next(iter(self._entries)))

    def _drop(self, entry_id: int) -> None:
        self.nbytes -= self._entries.pop(entry_id).kv.nbytes
