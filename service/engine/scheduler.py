"""Which sequences run each step: admission by free KV rows, chunked prefill under a token budget.

Fair between owners (principals): waiting sequences are admitted in turn from each owner's queue,
oldest first within an owner, so one owner's long queue cannot hold another's request back; and the
owners with prompts to prefill take turns at the front of each step's prefill budget, so one owner's
long prompt cannot hold back another's short one for the whole of its prefill.

Pure Python, no torch: the scheduler sees sequence ids and token counts, never text or tensors.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class ScheduledSequence:
    """The scheduler's view of one sequence."""

    seq_id: int
    prompt_len: int
    owner: str = ""  # the principal the sequence belongs to: the unit of fairness
    prefilled: int = 0  # prompt tokens whose KV is in the cache (including a reused prefix)
    phase: Phase = Phase.WAITING


@dataclass(frozen=True)
class PrefillSlice:
    seq_id: int
    start: int
    end: int
    last: bool


@dataclass
class StepPlan:
    prefill: list[PrefillSlice] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)  # sequences decoding after this step's prefill


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 16
    # Prompt tokens prefilled per step across all sequences. Bounds how long one step can stall the
    # running streams: a long prompt is cut into chunks interleaved with decode steps. The default
    # model prefills ~1,000-2,000 tokens/s near the start of a prompt on this 2-core CPU.
    prefill_tokens_per_step: int = 256
    # With a span, a token at prompt position p counts as 1 + p / span tokens of that budget: its
    # attention reads every position before it, and at `span` positions that costs as much as the
    # rest of its forward pass. A step's prefill then takes about as long deep in a long context as
    # near its start. 0: every token counts as one.
    prefill_attention_span: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        # Each owner's waiting sequences, oldest first; the owner whose turn is next comes first.
        self._waiting: OrderedDict[str, deque[ScheduledSequence]] = OrderedDict()
        self._num_waiting = 0
        self._prefill_turns: list[str] = []  # owners in the order they lead the prefill budget
        self._held: set[int] = set()  # admitted, but not prefilled until released (see `hold`)
        self._prefilling: list[ScheduledSequence] = []
        self._decoding: dict[int, ScheduledSequence] = {}
        self._all: dict[int, ScheduledSequence] = {}

    # ---- membership ----

    def add(self, seq: ScheduledSequence) -> None:
        self._waiting.setdefault(seq.owner, deque()).append(seq)
        self._num_waiting += 1
        self._all[seq.seq_id] = seq

    def remove(self, seq_id: int) -> Phase | None:
        """Forget a sequence in any phase; returns the phase it was in (None when unknown)."""
        seq = self._all.pop(seq_id, None)
        self._held.discard(seq_id)
        if seq is None:
            return None
        if seq.phase is Phase.WAITING:
            queue = self._waiting[seq.owner]
            queue.remove(seq)
            self._num_waiting -= 1
            if not queue:
                del self._waiting[seq.owner]
        elif seq.phase is Phase.PREFILL:
            self._prefilling.remove(seq)
        else:
            del self._decoding[seq_id]
        return seq.phase

    def get(self, seq_id: int) -> ScheduledSequence | None:
        return self._all.get(seq_id)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def num_decoding(self) -> int:
        return len(self._decoding)

    def __len__(self) -> int:
        return len(self._all)

    def has_work(self) -> bool:
        return bool(self._all)

    # ---- the plan ----

    def admit(self) -> list[int]:
        """Move waiting sequences into prefill while KV rows are free: one from each owner in turn,
        each owner's oldest first. An owner that got a row goes to the back of the line."""
        admitted = []
        while self._waiting and self.num_running < self.config.max_batch_size:
            owner, queue = next(iter(self._waiting.items()))
            seq = queue.popleft()
            self._num_waiting -= 1
            if queue:
                self._waiting.move_to_end(owner)
            else:
                del self._waiting[owner]
            seq.phase = Phase.PREFILL
            self._prefilling.append(seq)
            admitted.append(seq.seq_id)
        return admitted

    def plan(self) -> StepPlan:
        """Prefill chunks within the budget (oldest first); decoding is settled by complete_prefill.

        Called after admission, so a prefix reused at admission (sessions) is already skipped."""
        plan = StepPlan()
        budget = float(self.config.prefill_tokens_per_step)
        for seq in self._prefill_order():
            remaining = seq.prompt_len - seq.prefilled
            take = self._tokens_within(budget, seq.prefilled, remaining)
            if take == 0 and not plan.prefill and remaining > 0:
                take = 1  # a step always makes progress, however deep the prompt
            if take == 0:
                break
            end = seq.prefilled + take
            plan.prefill.append(PrefillSlice(seq.seq_id, seq.prefilled, end, end == seq.prompt_len))
            budget -= self._cost(seq.prefilled, take)
        return plan

    def hold(self, seq_id: int) -> None:
        """Keep an admitted sequence from prefilling until `release`: another sequence is computing
        the prefix it will copy."""
        self._held.add(seq_id)

    def release(self, seq_id: int) -> None:
        self._held.discard(seq_id)

    def _prefill_order(self) -> list[ScheduledSequence]:
        """This step's prefill order: owners take turns leading (the one that led last step goes
        last), each owner's sequences oldest first. With one owner: oldest first. Held ones wait."""
        prefilling = [seq for seq in self._prefilling if seq.seq_id not in self._held]
        owners = list(dict.fromkeys(seq.owner for seq in prefilling))
        if len(owners) < 2:
            self._prefill_turns = owners
            return prefilling
        known = [owner for owner in self._prefill_turns if owner in owners]
        turns = known + [owner for owner in owners if owner not in known]
        turns.append(turns.pop(0))  # the owner that led before waits its turn
        self._prefill_turns = turns
        rank = {owner: i for i, owner in enumerate(turns)}
        return sorted(prefilling, key=lambda seq: rank[seq.owner])  # stable: oldest first per owner

    def _cost(self, start: int, count: int) -> float:
        """What `count` prompt tokens from position `start` take of the budget."""
        span = self.config.prefill_attention_span
        if span <= 0:
            return float(count)
        return count + (count * start + count * (count - 1) / 2) / span  # sum of 1 + p / span

    def _tokens_within(self, budget: float, start: int, remaining: int) -> int:
        """The most prompt tokens from `start` (at most `remaining`) whose cost fits `budget`."""
        span = self.config.prefill_attention_span
        if budget <= 0:
            return 0
        if span <= 0:
            return min(remaining, int(budget))
        # cost(n) = n^2 / (2 span) + n (1 + (start - 1/2) / span): the positive root, then exact
        a, b = 1 / (2 * span), 1 + (start - 0.5) / span
        take = min(remaining, int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)) + 1)
        while take > 0 and self._cost(start, take) > budget:
            take -= 1
        return take

    def complete_prefill(self, plan: StepPlan) -> None:
        """Record the prefill slices as done; finished prompts move to decoding."""
        for piece in plan.prefill:
            seq = self._all.get(piece.seq_id)
            if seq is None or seq.phase is not Phase.PREFILL:
                continue
            seq.prefilled = piece.end
            if piece.last:
                seq.phase = Phase.DECODE
                self._prefilling.remove(seq)
                self._decoding[seq.seq_id] = seq
        plan.decode = list(self._decoding)

    def restart_prefill_at(self, seq_id: int, position: int) -> None:
        """A reused prefix (session) covers the prompt up to `position`."""
        seq = self._all[seq_id]
        seq.prefilled = position
