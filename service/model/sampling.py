"""Logits to token ids for a whole decode batch, each row with its own sampling parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokenwire.service.model.types import SamplingParams

__all__ = [
    "SampleOutput",
    "SamplingRow",
    "make_generator",
    "mark_seen",
    "sample",
    "seen_mask",
]

# Semantics follow transformers' logits processors in generate()'s order: repetition penalty on
# float32 logits, then temperature, top-k, top-p, min-p.  Greedy is the argmax of the penalised logits.
#
# Sampled rows work on weights exp((x - max) / t), whose maximum is exactly 1.  Top-k, top-p and
# min-p each come down to a cutoff weight (the k-th largest, the smallest in the nucleus, min_p),
# so one "keep weights >= cutoff" applies all three; then a token is drawn by inverse CDF in vocab
# order with a single uniform from the row's own generator.
#
# CPU cost (measured on the 2-core dev box, one thread, 16 x 49152 float32):
# - torch.argmax is not vectorised (~1 ms); block maxima, then argmax in the winning block: ~0.2 ms.
# - torch.sort of a 49k row takes ~4 ms, numpy's ~0.2 ms, and most rows need no sort at all: the
#   largest weights are ranked 64 at a time (blocked top-k, with token ids), then 1024 and then
#   all (numpy, values only).
# - When the ranked candidates hold every kept token (the usual case: a nucleus of a handful of
#   tokens), the draw runs over those few.  Otherwise it runs over the whole row, masked with
#   arithmetic: boolean-mask ops on irregular masks are ~10x slower than arithmetic here.
#
# Reproducibility: a seeded row must pick the same token alone or in any batch.  Each sampled row
# draws exactly one uniform per step, and every reduction on sampled rows gives the same bits for a
# row alone or in a batch (amax, cumsum, sorts, numpy's row sums).  torch.sum and logsumexp do not:
# with 2 threads a lone row is split across threads, a batch is split by rows.  On CUDA, kernels may
# still round differently for different batch shapes.

_BLOCK = 128  # top-k block width: a multiple of the SIMD width, and 49152 = 384 * 128
# Top-k/top-p rank the largest weights this many at a time, then the whole row, stopping as soon as
# every row's cut is known: real SmolLM2 logits at temperature 0.7-1.0 have a median top-p 0.9
# nucleus of 4-45 tokens, a 90th percentile of 30-450, and only a few percent above 1024.
_RANK_WIDTHS = (64, 1024)
_SMALL_VOCAB = 1024  # up to this, ranking a whole row keeps the token ids too
_FLUSH = -80.0  # temperature-scaled logits this far below the best token weigh exactly 0


@dataclass
class SamplingRow:
    """One request's sampling state, kept by the runner for the request's lifetime."""

    params: SamplingParams
    generator: torch.Generator | None = None  # None when greedy; see make_generator


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (any int; taken modulo 2**64)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)  # manual_seed rejects values outside the uint64 range
    return generator


@dataclass
class SampleOutput:
    """What one sample() call chose, row by row."""

    token_ids: list[int]  # one per row
    # Log-probability of each chosen token under the raw distribution (before penalty and
    # temperature); -inf, never NaN, for a row whose logits are all -inf.  None when not asked.
    logprobs: list[float] | None = None
    # Per row, the top_n (token_id, logprob) pairs, best first, from the same distribution.
    top: list[list[tuple[int, float]]] | None = None


def seen_mask(token_ids: Sequence[int], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A [vocab_size] bool mask with `token_ids` set: one request's row of `seen` after its prompt."""
    seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mark_seen(seen, token_ids)
    return seen


def mark_seen(
    seen: torch.Tensor,
    token_ids: Sequence[int] | torch.Tensor,
    rows: Sequence[int] | torch.Tensor | None = None,
) -> None:
    """Record tokens in a `seen` mask, in place; ids outside the vocabulary are ignored.

    1-D `seen` ([vocab], one request): marks every id (a prompt, or one new token).
    2-D `seen` ([slots, vocab]): marks token_ids[i] in row rows[i] (rows defaults to 0..n-1), i.e. one
    decode step for a batch, with a single indexed write instead of one per request.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=seen.device).reshape(-1)
    inside = (ids >= 0) & (ids < seen.shape[-1])  # e.g. added special tokens beyond the logits
    if seen.dim() == 1:
        seen[ids[inside]] = True
        return
    if rows is None:
        row_ids = torch.arange(ids.numel(), device=seen.device)
    else:
        row_ids = torch.as_tensor(rows, dtype=torch.long, device=seen.device).reshape(-1)
    seen[row_ids[inside], ids[inside]] = True


def sample(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    *,
    seen: torch.Tensor | None = None,
    logprobs: bool = False,
    top_n: int = 0,
) -> SampleOutput:
    """Pick one token per row of `logits` ([rows, vocab], any float dtype; not modified).

    `seen` ([rows, vocab] bool) marks each request's prompt and output tokens; it is required when
    a row has repetition_penalty != 1.  Greedy rows (temperature 0) take the argmax of the penalised
    logits (the first one on ties); sampled rows draw one uniform from their own generator (the
    global torch RNG when it is None).  A sampled row with NaN or no finite maximum takes the argmax.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [rows={len(rows)}, vocab], got {tuple(logits.shape)}")
    logits = logits.detach()
    params = [row.params for row in rows]
    sampled = [i for i, p in enumerate(params) if _temperature(p) > 0.0]
    penalised = [i for i, p in enumerate(params) if _penalty(p) != 1.0]
    if penalised and seen is None:
        raise ValueError("seen is required when a row has repetition_penalty != 1")
    want_top = max(0, min(top_n, logits.shape[1]))

    if not sampled and not penalised and not logprobs and not want_top:
        # The common all-greedy step: one argmax, one device->host copy.  On CPU, bf16/fp16 block
        # maxima are slower than converting to float32 first (0.4 vs 0.5 ms for 16 rows).
        x = logits.float() if logits.device.type == "cpu" else logits
        return SampleOutput(token_ids=_argmax(x).tolist())

    # Like generate(): the processors run on a float32 copy of the logits.
    x = logits.float()
    if penalised:
        assert seen is not None
        x = _apply_penalty(x, seen, penalised, [_penalty(params[i]) for i in penalised])
    # `private`: x is our own copy, so the sampling math may overwrite it instead of allocating.
    private = x is not logits
    if len(sampled) == len(rows):
        ids = _sample_rows(x, list(rows), private)
    else:
        ids = _argmax(x)
        if sampled:
            index = torch.tensor(sampled, device=x.device)
            ids[index] = _sample_rows(x.index_select(0, index), [rows[i] for i in sampled], True)
    out = SampleOutput(token_ids=ids.tolist())

    if logprobs or want_top:
        raw = torch.log_softmax(logits.float(), dim=-1)
        if logprobs:
            chosen = raw.gather(1, ids.unsqueeze(1)).squeeze(1)
            out.logprobs = _no_nan(chosen).tolist()
        if want_top:
            values, indices = _topk(raw, want_top)
            out.top = [
                list(zip(row_ids, row_values, strict=True))
                for row_ids, row_values in zip(indices.tolist(), _no_nan(values).tolist(), strict=True)
            ]
    return out


def argmax_only(params: SamplingParams) -> bool:
    """Whether `sample` takes a row's plain argmax (greedy, no repetition penalty): without bans,
    logprobs or top tokens, a step of such rows needs nothing but each row's argmax."""
    return _temperature(params) == 0.0 and _penalty(params) == 1.0


def _temperature(params: SamplingParams) -> float:
    # Anything not > 0 (0, negative, NaN) is greedy: a negative temperature would invert the model.
    t = params.temperature
    return t if t > 0.0 else 0.0


def _penalty(params: SamplingParams) -> float:
    # A penalty that is not > 0 would flip signs or divide by zero; treat it as off.
    r = params.repetition_penalty
    return r if r > 0.0 else 1.0


def _no_nan(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax with torch.argmax's answer (first maximum; NaN counts as the maximum).

    On CPU through numpy, whose argmax answers the same: one thread, vectorised, 8 us for a row of
    49152 and 144 us for 16 (torch: 56 and 219 us, and its parallel reductions wake torch's
    sleeping OpenMP threads in the middle of a decode step).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.argmax(dim=-1)
    return torch.from_numpy(x.contiguous().numpy().argmax(axis=-1))


def _apply_penalty(
    x: torch.Tensor, seen: torch.Tensor, rows: list[int], penalties: list[float]
) -> torch.Tensor:
    """CTRL / transformers repetition penalty on seen tokens: positive / r, negative * r."""
    if seen.shape != x.shape:
        raise ValueError(f"seen must be {tuple(x.shape)}, got {tuple(seen.shape)}")
    index = None if len(rows) == x.shape[0] else torch.tensor(rows, device=x.device)
    sub = x if index is None else x.index_select(0, index)
    mask = (seen if index is None else seen.index_select(0, index)).bool()
    r = torch.tensor(penalties, dtype=x.dtype, device=x.device).unsqueeze(1)
    # Exactly one of the two terms is non-zero, so this is bit-identical to transformers'
    # where(x < 0, x * r, x / r).  where() is cheap here because `seen` is sparse.
    scaled = sub.clamp(min=0).div_(r).add_(sub.clamp(max=0).mul_(r))
    penalised = torch.where(mask, scaled, sub, out=scaled)
    if index is None:
        return penalised
    out = x.clone()  # x may be the caller's logits
    out.index_copy_(0, index, penalised)
    return out


def _sample_rows(x: torch.Tensor, rows: list[SamplingRow], private: bool) -> torch.Tensor:
    """Draw one token per row of x (float32, penalised) by inverse CDF in vocab order."""
    device = x.device
    # Draw first, so every sampled row consumes exactly one number per step whatever happens below.
    uniform = torch.cat(
        [
            torch.rand(1, generator=row.generator, device=device)
            if row.generator is not None
            else torch.rand(1, device=device)
            for row in rows
        ]
    ).unsqueeze(1)
    params = [row.params for row in rows]
    temperature = torch.tensor([_temperature(p) for p in params], dtype=x.dtype, device=device)
    top = x.amax(dim=1, keepdim=True)
    finite = torch.isfinite(top).squeeze(1)
    # Rows with NaN, +inf or only -inf have no distribution: argmax, taken before x is overwritten.
    fallback = None if bool(finite.all()) else _argmax(x)
    # Unnormalised probabilities exp((x - max) / t): the best token weighs exactly 1, and a tiny
    # temperature can only underflow the others to 0, never overflow.  Nothing needs the
    # normalised form (min-p is a ratio, top-p divides by the row total), which saves a pass.
    # Tokens below e^-80 of the best are dropped first: they could never be drawn, and as float32
    # subnormals they would slow every later pass.
    scaled = (x.sub_(top) if private else x - top).div_(temperature.unsqueeze(1))
    weights = torch.nn.functional.threshold(scaled, _FLUSH, -math.inf, inplace=True).exp_()
    cut = _cutoff(weights, params)
    if cut is None:
        picked = _inverse_cdf(weights, uniform)
    else:
        cutoff, groups = cut
        picked = torch.empty(len(rows), dtype=torch.long, device=device)
        # Where the ranked candidates hold every kept token, draw among those alone: the result is
        # bitwise the same as the full-vocabulary draw (the same kept weights in the same order,
        # and a sequential cumsum is unchanged by the zeros in between).  Which way a row goes
        # may depend on its batch (a neighbour's top_k widens the ranking), the token does not.
        wide: list[torch.Tensor] = []
        for index, ranked, ids in groups:
            here = torch.arange(len(rows), device=device) if index is None else index
            part = cutoff[here]
            if ids is None:  # only values were ranked
                covered = torch.zeros(len(here), dtype=torch.bool, device=device)
            elif ranked.shape[1] == weights.shape[1]:  # every token was ranked
                covered = torch.ones(len(here), dtype=torch.bool, device=device)
            else:  # nothing outside the ranking reaches the cutoff
                covered = (ranked[:, -1:] < part).squeeze(1)
            if bool(covered.any()):
                few = covered.nonzero().squeeze(1)
                assert ids is not None
                picked[here[few]] = _draw_among(ranked[few], ids[few], part[few], uniform[here[few]])
            if not bool(covered.all()):
                wide.append(here[~covered])
        if wide:
            index = torch.cat(wide)
            kept = _keep_from(weights.index_select(0, index), cutoff[index])
            picked[index] = _inverse_cdf(kept, uniform[index])
    return picked if fallback is None else torch.where(finite, picked, fallback)


def _take(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t.index_select(0, index)


def _keep_from(weights: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """Weights with those below `cutoff` ([rows, 1]) set to 0, without a boolean-mask pass."""
    # keep = weights >= cutoff; against the next float below the cutoff that is a strict >, and
    # ceil(clamp(weights - below, 0, 1)) is then exactly 1 for kept tokens and 0 for dropped ones.
    # A cutoff of 0 keeps everything (below = -1 avoids subnormal arithmetic).
    below = torch.where(cutoff > 0, torch.nextafter(cutoff, torch.full_like(cutoff, -math.inf)), -1.0)
    return (weights - below).clamp_(0.0, 1.0).ceil_().mul_(weights)


def _draw_among(
    ranked: torch.Tensor, ids: torch.Tensor, cutoff: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """_inverse_cdf over ranked candidates (weights descending, with their ids) that hold every
    kept token; the kept ones are a prefix, so only that prefix is put back in vocab order."""
    keep = ranked >= cutoff
    width = max(1, int(keep.sum(dim=1).max()))
    ids = ids[:, :width]
    order = ids.argsort(dim=1)
    kept = torch.where(keep[:, :width], ranked[:, :width], 0.0).gather(1, order)
    position = _inverse_cdf(kept, uniform)
    return ids.gather(1, order).gather(1, position.unsqueeze(1)).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first position where the running weight exceeds uniform * total (total > 0)."""
    cdf = weights.cumsum(dim=1)  # sequential per row, so bitwise the same alone or in a batch
    total = cdf[:, -1:]
    # u < 1 but u * total may round up to total; stay strictly below it so the pick is a kept token.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    # The clamp only matters for NaN rows, whose pick the caller replaces.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)


# Rows of the batch (None: all of them), their largest weights descending, and those tokens' ids
# (None when only values were ranked).
_Group = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def _cutoff(weights: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, list[_Group]] | None:
    """Per-row weight below which top-k, top-p and min-p drop tokens, or None when none is set.

    `weights` are unnormalised probabilities whose row maximum is exactly 1.  Returns the cutoff
    ([rows, 1]) and the rankings it was read from, which every row appears in exactly once.
    """
    n_rows, vocab = weights.shape
    device, dtype = weights.device, weights.dtype
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else 1.0 for p in params]  # NaN compares false: off
    min_p = [p.min_p if p.min_p > 0.0 else 0.0 for p in params]
    use_k, use_p, use_min = any(top_k), any(q < 1.0 for q in top_p), any(min_p)
    if not (use_k or use_p or use_min):
        return None
    # min-p is a ratio to the best token (weight 1), so top-k/top-p renormalising does not move it.
    floor = torch.tensor(min_p, dtype=dtype, device=device).unsqueeze(1)
    k = torch.tensor(top_k, device=device).unsqueeze(1)
    p = torch.tensor(top_p, dtype=dtype, device=device).unsqueeze(1)
    total = _row_sums(weights) if use_p else None
    cutoff = torch.empty_like(floor)
    groups: list[_Group] = []
    index: torch.Tensor | None = None  # the rows still to settle (None: all)
    done_width = 0
    for level in (*_RANK_WIDTHS, vocab):
        part_k = _take(k, index)
        # One more than top_k, so the draw can see that no tie of the k-th weight was left out.
        width = min(vocab, max(level, int(part_k.max()) + 1))
        if width <= done_width:  # a neighbour's top_k already ranked this wide
            continue
        done_width = width
        ranked, ids = _rank(_take(weights, index), width)
        cut = _take(floor, index)
        if use_k:
            # The k-th largest weight: its ties are kept, as in transformers' TopKLogitsWarper.
            kth = ranked.gather(1, (part_k - 1).clamp(min=0, max=ranked.shape[1] - 1))
            cut = torch.maximum(cut, torch.where(part_k > 0, kth, 0.0))
        unsettled = None
        if use_p:
            assert total is not None
            part_p = _take(p, index)
            count = _nucleus_size(ranked, part_k, part_p, _take(total, index))
            nucleus = ranked.gather(1, (count - 1).clamp(max=ranked.shape[1] - 1))
            cut = torch.maximum(cut, torch.where(part_p < 1.0, nucleus, 0.0))
            if ranked.shape[1] < vocab:
                # A nucleus wider than the ranking: rank those rows wider.
                open_rows = ((count > ranked.shape[1]) & (part_p < 1.0)).squeeze(1)
                unsettled = open_rows if bool(open_rows.any()) else None
        if unsettled is None:
            _put(cutoff, index, cut)
            groups.append((index, ranked, ids))
            break
        here = (~unsettled).nonzero().squeeze(1)
        rows_all = torch.arange(n_rows, device=device) if index is None else index
        if here.numel():
            _put(cutoff, rows_all[here], cut[here])
            groups.append((rows_all[here], ranked[here], None if ids is None else ids[here]))
        index = rows_all[unsettled]
    # Never drop the best token (min_p > 1, or rounding at the top).
    return cutoff.clamp_(max=1.0), groups


def _put(t: torch.Tensor, index: torch.Tensor | None, value: torch.Tensor) -> None:
    if index is None:
        t.copy_(value)
    else:
        t[index] = value


def _nucleus_size(
    ranked: torch.Tensor, k: torch.Tensor, p: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """How many of the ranked tokens each row's nucleus holds ([rows, 1]; > width when undecided)."""
    width = ranked.shape[1]
    if bool((k > 0).any()):
        # top-p runs after top-k, on the distribution renormalised over the k best tokens.
        position = torch.arange(width, device=ranked.device).unsqueeze(0)
        mass = torch.where((k <= 0) | (position < k), ranked, 0.0).cumsum(dim=1)
        total = torch.where(k > 0, mass.gather(1, (k - 1).clamp(min=0, max=width - 1)), total)
    else:
        mass = ranked.cumsum(dim=1)
    # Keep token i while the mass strictly before it is below top_p (so at least one token); the
    # running mass never decreases, so counting those positions is a binary search.
    return torch.searchsorted(mass, (p * total).contiguous()) + 1


def _row_sums(weights: torch.Tensor) -> torch.Tensor:
    """Row sums that do not depend on the batch around the row ([rows, 1])."""
    if weights.device.type != "cpu":
        return weights.sum(dim=1, keepdim=True)
    # torch.sum splits a lone row across threads but not rows of a batch, so the last bit differs;
    # numpy sums each contiguous row the same way whatever the batch.
    return torch.from_numpy(weights.numpy().sum(axis=1, keepdims=True))


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) along rows: the same values; the index among equal values may differ."""
    n_rows, vocab = x.shape
    if x.device.type != "cpu" or vocab % _BLOCK or k * _BLOCK * 4 > vocab:
        values, indices = x.topk(k, dim=1)
        return values, indices
    # The k largest values all lie in the k blocks with the largest maxima, so rank only those.
    blocks = x.reshape(n_rows, -1, _BLOCK)
    best = blocks.amax(dim=2).topk(k, dim=1).indices
    candidates = blocks.gather(1, best.unsqueeze(2).expand(-1, -1, _BLOCK)).reshape(n_rows, -1)
    values, position = candidates.topk(k, dim=1)
    return values, best.gather(1, position // _BLOCK) * _BLOCK + position % _BLOCK


def _rank(weights: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `width` largest weights of each row, descending, with their token ids when cheap."""
    vocab = weights.shape[1]
    width = min(width, vocab)
    if weights.device.type != "cpu":
        if width * 8 <= vocab:
            return weights.topk(width, dim=1)
        values, ids = weights.sort(dim=1, descending=True)
        return values[:, :width], ids[:, :width]
    if width * _BLOCK * 4 <= vocab and vocab % _BLOCK == 0:
        return _topk(weights, width)
    # numpy's vectorised sorts are ~20x faster than torch.sort on CPU here.  Sorting negated
    # values ascending gives descending order without a reversed copy.
    flipped = np.negative(weights.numpy())
    if vocab <= _SMALL_VOCAB:  # rank every token, ids included
        order = np.argsort(flipped, axis=1)[:, :width]
        ranked = np.negative(np.take_along_axis(flipped, order, axis=1))
        return torch.from_numpy(ranked), torch.from_numpy(order)
    # Values only: numpy's argpartition would build a full-size index array, and costs more than
    # the masked full-row draw these (wide-nucleus) rows then take instead.
    if width * 4 <= vocab:
        flipped.partition(width - 1, axis=1)
        flipped = flipped[:, :width]
    flipped.sort(axis=1)
    return torch.from_numpy(np.negative(flipped[:, :width])), None
