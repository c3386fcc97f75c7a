"""Tests for batched sampling: greedy, temperature, top-k/top-p/min-p, penalties, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tokenwire.service.model.sampling import (
    SamplingRow,
    _argmax,
    _draw_among,
    _inverse_cdf,
    _keep_from,
    _rank,
    _topk,
    make_generator,
    mark_seen,
    sample,
    seen_mask,
)
from tokenwire.service.model.types import SamplingParams

GREEDY = SamplingParams()


def row(params: SamplingParams, seed: int = 0) -> SamplingRow:
    return SamplingRow(params, None if params.greedy else make_generator(seed, "cpu"))


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent draws from one row of logits, as a batch of n rows with their own seeds."""
    batch = logits.reshape(1, -1).expand(n, -1)
    return torch.tensor(sample(batch, [row(params, seed + i) for i in range(n)]).token_ids)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- greedy ----


@pytest.mark.parametrize("vocab", [7, 300, 1000, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(vocab: int, dtype: torch.dtype) -> None:
    logits = (torch.randn(5, vocab, generator=gen(vocab)) * 4).to(dtype)
    logits[1, -1] = 100.0  # maximum in the short last block
    logits[2, 3] = logits[2, vocab // 2] = 100.0  # a tie: the first one wins
    logits[3, :] = -math.inf
    got = sample(logits, [row(GREEDY)] * 5).token_ids
    assert got == logits.argmax(dim=-1).tolist()
    assert got[1] == vocab - 1 and got[2] == 3 and got[3] == 0


def test_argmax_matches_torch() -> None:
    for vocab in (256, 257, 383, 1000, 4096, 49152):
        x = torch.randn(6, vocab, generator=gen(vocab))
        x[0, vocab - 1] = 9.0
        x[1, vocab - 129] = 9.0  # in the overlap of the last window with the block before
        x[2, 5] = x[2, vocab - 2] = 9.0
        x[3, 200] = math.nan
        x[4] = -math.inf
        x[5, 17] = math.inf
        assert _argmax(x).tolist() == x.argmax(dim=-1).tolist(), vocab


def test_greedy_fast_path_equals_general_path() -> None:
    logits = torch.randn(16, 4096, generator=gen(1))
    fast = sample(logits, [row(GREEDY)] * 16).token_ids
    general = sample(logits, [row(GREEDY)] * 16, logprobs=True).token_ids
    assert fast == general == logits.argmax(dim=-1).tolist()
    # Greedy rows of a mixed batch are untouched by the sampled rows around them.
    mixed = [row(GREEDY) if i % 2 else row(SamplingParams(temperature=1.0), i) for i in range(16)]
    got = sample(logits, mixed).token_ids
    assert got[1::2] == fast[1::2]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=t, **cut)
        for t in (0.3, 1.0, 2.5)
        for cut in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"top_k": 5, "top_p": 1e-6})
    ]
    + [SamplingParams(temperature=1e-5), SamplingParams(temperature=1e-30)],
)
def test_truncation_to_one_token_is_greedy(params: SamplingParams) -> None:
    logits = torch.randn(8, 2000, generator=gen(2)) * 3  # continuous values: no ties
    want = logits.argmax(dim=-1).tolist()
    for seed in range(5):
        assert sample(logits, [row(params, seed * 8 + i) for i in range(8)]).token_ids == want


def test_greedy_matches_transformers_with_penalty() -> None:
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 3000, generator=gen(3)) * 3
    history = torch.randint(0, 3000, (4, 40), generator=gen(4))
    seen = torch.zeros(4, 3000, dtype=torch.bool)
    mark_seen(seen, history.flatten(), torch.arange(4).repeat_interleave(40))
    for penalty in (1.3, 0.7):
        want = lp.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone()).argmax(dim=-1)
        got = sample(logits, [row(SamplingParams(repetition_penalty=penalty))] * 4, seen=seen)
        assert got.token_ids == want.tolist()


# ---- repetition penalty ----


@pytest.mark.parametrize(
    ("logits", "seen", "penalty", "want"),
    [
        ([3.0, 2.0, -1.0], [0], 1.0, 0),  # no penalty
        ([3.0, 2.0, -1.0], [0], 2.0, 1),  # positive: 3 / 2 = 1.5 < 2
        ([3.0, 2.0, -1.0], [0], 1.4, 0),  # 3 / 1.4 = 2.14 > 2
        ([-1.0, -1.5, -4.0], [0], 2.0, 1),  # negative: -1 * 2 = -2 < -1.5
        ([-1.0, -1.5, -4.0], [1], 2.0, 0),  # penalising the runner-up changes nothing
        ([1.0, 1.5, -4.0], [0], 0.5, 0),  # a penalty below 1 rewards: 1 / 0.5 = 2 > 1.5
        ([-3.0, -1.5, -4.0], [0], 0.25, 0),  # -3 * 0.25 = -0.75 > -1.5
        ([2.0, -math.inf, 1.0], [0, 1], 4.0, 2),  # -inf stays -inf
    ],
)
def test_repetition_penalty(logits: list[float], seen: list[int], penalty: float, want: int) -> None:
    x = torch.tensor([logits])
    mask = seen_mask(seen, len(logits)).unsqueeze(0)
    assert sample(x, [row(SamplingParams(repetition_penalty=penalty))], seen=mask).token_ids == [want]
    # Sampled rows are penalised too: top_k=1 samples the penalised argmax.
    sampled = SamplingParams(temperature=1.0, top_k=1, repetition_penalty=penalty)
    assert sample(x, [row(sampled)], seen=mask).token_ids == [want]


def test_penalty_is_bit_identical_to_transformers() -> None:
    lp = pytest.importorskip("transformers.generation.logits_process")
    from tokenwire.service.model.sampling import _apply_penalty

    logits = torch.randn(3, 500, generator=gen(5)) * 5
    logits[0, :50] = 0.0
    history = torch.randint(0, 500, (3, 100), generator=gen(6))
    seen = torch.zeros(3, 500, dtype=torch.bool)
    for i in range(3):
        mark_seen(seen[i], history[i])
    want = lp.RepetitionPenaltyLogitsProcessor(1.37)(history, logits.clone())
    assert torch.equal(_apply_penalty(logits, seen, [0, 1, 2], [1.37] * 3), want)
    # Only the listed rows are penalised.
    got = _apply_penalty(logits, seen, [1], [1.37])
    assert torch.equal(got[1], want[1]) and torch.equal(got[[0, 2]], logits[[0, 2]])


def test_penalty_needs_seen() -> None:
    with pytest.raises(ValueError, match="seen"):
        sample(torch.zeros(1, 10), [row(SamplingParams(repetition_penalty=1.2))])


# ---- temperature, top-k, top-p, min-p ----


def test_temperature_sampling_follows_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -math.inf])
    for temperature in (0.7, 1.0, 1.8):
        n = 6000
        picks = torch.cat(
            [draws(logits, SamplingParams(temperature=temperature), 500, seed=s * 500) for s in range(12)]
        )
        observed = torch.bincount(picks, minlength=8).double()
        expected = torch.softmax(logits.double() / temperature, dim=0) * n
        assert observed[7] == 0  # -inf is never drawn
        live = expected > 0
        chi2 = (((observed - expected) ** 2)[live] / expected[live]).sum().item()
        assert chi2 < 30.0, (temperature, chi2, observed.tolist())  # 6 dof: p < 1e-4


def _hf_kept(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """The tokens transformers' warpers leave finite, applied in generate()'s order."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    scores = logits.reshape(1, -1).clone()
    warpers = [lp.TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(lp.MinPLogitsWarper(params.min_p))
    for warp in warpers:
        scores = warp(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=2.0, top_k=10),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.5, top_p=0.9),
        SamplingParams(temperature=0.7, min_p=0.2),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=1.0, top_k=8, top_p=0.6),
        SamplingParams(temperature=1.3, top_k=20, top_p=0.8, min_p=0.1),
    ],
)
def test_truncation_keeps_exactly_what_transformers_keeps(params: SamplingParams) -> None:
    logits = torch.randn(64, generator=gen(7)) * 2
    kept = _hf_kept(logits, params)
    picked = set(draws(logits, params, 3000).tolist())
    assert picked <= kept  # never an excluded token
    if len(kept) <= 12:
        assert picked == kept  # and every kept one shows up in 3000 draws


def test_top_p_on_a_wide_vocabulary() -> None:
    # Wide nuclei (more than the ranked candidates) take the full-sort route.
    logits = torch.randn(49152, generator=gen(8)) * 0.5
    params = SamplingParams(temperature=1.0, top_p=0.3)
    kept = _hf_kept(logits, params)
    assert len(kept) > 5000
    picked = set(draws(logits, params, 400).tolist())
    assert picked <= kept


def test_sampling_avoids_minus_inf_tokens() -> None:
    logits = torch.full((300,), -math.inf)
    logits[[3, 150, 299]] = torch.tensor([0.0, 1.0, 0.5])
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=5.0, top_p=0.99)):
        assert set(draws(logits, params, 2000).tolist()) == {3, 150, 299}


# ---- seeds ----


def _mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.8, top_k=20, seed=2),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3),
        SamplingParams(temperature=0.6, top_p=0.5, min_p=0.05, seed=4),
        SamplingParams(temperature=1.2, top_k=2000, top_p=0.95, seed=5),
        SamplingParams(temperature=0.9, min_p=0.1, repetition_penalty=1.3, seed=6),
        SamplingParams(repetition_penalty=1.2),
    ]


@pytest.mark.parametrize("vocab", [1000, 49152])
def test_seeded_row_is_the_same_alone_and_in_a_batch(vocab: int) -> None:
    params = _mixed_params()
    n, steps = len(params), 50
    g = gen(vocab)
    # Per row: flat or peaked; row 3's nucleus is sometimes wider than the 1024 ranked candidates
    # (alone: a full sort) but within the 2000 that row 5's top_k makes the batch rank.
    scale = torch.tensor([0.3, 1.0, 3.0, 3.2, 2.0, 0.8, 1.5, 4.0]).unsqueeze(1)
    logits = [torch.randn(n, vocab, generator=g) * scale for _ in range(steps)]

    def run(order: list[int]) -> dict[int, list[int]]:
        rows = [SamplingRow(params[i], make_generator(i + 100, "cpu")) for i in order]
        seen = torch.zeros(len(order), vocab, dtype=torch.bool)
        out: dict[int, list[int]] = {i: [] for i in order}
        for step in range(steps):
            ids = sample(logits[step][order], rows, seen=seen).token_ids
            mark_seen(seen, ids)
            for i, token in zip(order, ids, strict=True):
                out[i].append(token)
        return out

    batch = run(list(range(n)))
    assert run(list(reversed(range(n)))) == batch
    for i in range(n):
        assert run([i]) == {i: batch[i]}, params[i]
    assert len(set(batch[1])) > 10  # sampled rows really vary


def test_same_seed_same_stream() -> None:
    logits = torch.randn(3, 500, generator=gen(9))
    params = SamplingParams(temperature=1.0)

    def stream(seed: int) -> list[list[int]]:
        rows = [SamplingRow(params, make_generator(seed, "cpu")) for _ in range(3)]
        return [sample(logits, rows).token_ids for _ in range(20)]

    assert stream(7) == stream(7)
    assert stream(7) != stream(8)
    assert stream(2**64 + 7) == stream(7)  # seeds are taken modulo 2**64
    stream(-1)  # any int is accepted


# ---- logprobs ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_top_n_match_log_softmax(dtype: torch.dtype) -> None:
    logits = (torch.randn(4, 49152, generator=gen(10)) * 3).to(dtype)
    rows = [row(GREEDY), row(SamplingParams(temperature=0.5), 1), row(SamplingParams(repetition_penalty=2.0))]
    rows.append(row(SamplingParams(temperature=1.0, top_k=5), 2))
    seen = torch.zeros(4, 49152, dtype=torch.bool)
    seen[2, logits[2].float().argmax()] = True
    out = sample(logits, rows, seen=seen, logprobs=True, top_n=5)
    ref = torch.log_softmax(logits.float(), dim=-1)  # raw: before penalty and temperature
    assert out.logprobs == [ref[i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.top is not None
    for i, top in enumerate(out.top):
        values, indices = ref[i].topk(5)
        assert [v for _, v in top] == values.tolist()
        assert all(ref[i, t].item() == v for t, v in top)
        assert [t for t, _ in top] == indices.tolist() or dtype == torch.bfloat16  # bf16 ties
    assert sample(logits, rows, seen=seen).logprobs is None
    assert sample(logits, rows, seen=seen).top is None
    only_top = sample(logits[:, :3], rows, seen=seen[:, :3], top_n=10)
    assert only_top.logprobs is None and only_top.top is not None
    assert [len(t) for t in only_top.top] == [3] * 4  # top_n is capped at the vocabulary


def test_ranking_matches_torch_sort() -> None:
    for vocab in (1000, 4096, 49152):
        x = torch.randn(5, vocab, generator=gen(vocab)).exp()
        x[0, :10] = x[0, 20]  # ties
        for width in (1, 5, 50, 65, 300, 1024, 2000, vocab):
            want = x.sort(dim=1, descending=True).values[:, : min(width, vocab)]
            ranked, ids = _rank(x, width)
            assert torch.equal(ranked, want), (vocab, width)
            if ids is not None:  # ids, where given, are distinct and name those weights
                assert torch.equal(x.gather(1, ids), ranked)
                assert all(len(set(r)) == len(r) for r in ids.tolist())
            else:  # ids come from the blocked top-k, or from ranking a small vocabulary in full
                assert vocab > 1024 and width * 128 * 4 > vocab
            if width <= vocab:
                values, indices = _topk(x, width)
                assert torch.equal(values, want) and torch.equal(x.gather(1, indices), values)


def test_drawing_among_candidates_equals_the_full_draw() -> None:
    # A row may take either route depending on its batch, so both must give the same token.
    g = gen(14)
    for trial in range(100):
        vocab = 32768
        weights = (torch.randn(4, vocab, generator=g) * (0.5 + trial % 5)).exp()
        weights /= weights.amax(dim=1, keepdim=True)
        weights[0, :50] = weights[0, 100]  # ties
        ranked, ids = _rank(weights, 64)
        assert ids is not None
        kept = torch.randint(1, 60, (4, 1), generator=g)
        cutoff = ranked.gather(1, kept - 1)
        covered = (ranked[:, -1:] < cutoff).squeeze(1)
        uniform = torch.rand(4, 1, generator=g)
        full = _inverse_cdf(_keep_from(weights, cutoff), uniform)
        few = _draw_among(ranked, ids, cutoff, uniform)
        assert torch.equal(full[covered], few[covered])


# ---- degenerate input ----


def test_degenerate_rows_do_not_crash_or_return_nan() -> None:
    vocab = 1000
    logits = torch.randn(6, vocab, generator=gen(11))
    logits[0] = -math.inf  # no finite logit at all
    logits[1] = -math.inf
    logits[2, 7] = math.nan
    logits[3, 42] = math.inf
    logits[4] *= 1e4  # huge logits with a tiny temperature
    rows = [
        row(GREEDY),
        row(SamplingParams(temperature=1.0, top_p=0.9, min_p=0.1, top_k=5), 1),
        row(SamplingParams(temperature=1.0), 2),
        row(SamplingParams(temperature=1.0, top_k=3), 3),
        row(SamplingParams(temperature=1e-5), 4),
        row(SamplingParams(temperature=1e-5, top_p=0.5), 5),
    ]
    out = sample(logits, rows, logprobs=True, top_n=3)
    assert out.token_ids[:2] == [0, 0]  # argmax of an all -inf row
    assert out.token_ids[3] == 42
    assert out.token_ids[4] == logits[4].argmax().item()
    assert out.token_ids[5] == logits[5].argmax().item()
    assert all(0 <= t < vocab for t in out.token_ids)
    assert out.logprobs is not None and out.top is not None
    assert not any(math.isnan(v) for v in out.logprobs)
    assert not any(math.isnan(v) for top in out.top for _, v in top)
    assert out.logprobs[0] == -math.inf


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-1.0),  # not > 0: greedy
        SamplingParams(temperature=math.nan),
        SamplingParams(temperature=1.0, top_k=-3),  # off
        SamplingParams(temperature=1.0, top_k=10**9),
        SamplingParams(temperature=1.0, top_p=0.0),  # keeps the best token
        SamplingParams(temperature=1.0, top_p=math.nan),  # off
        SamplingParams(temperature=1.0, min_p=5.0),  # keeps the best token
        SamplingParams(temperature=1.0, repetition_penalty=0.0),  # off
    ],
)
def test_out_of_range_params_do_not_crash(params: SamplingParams) -> None:
    logits = torch.randn(2, 300, generator=gen(12))
    seen = torch.ones(2, 300, dtype=torch.bool)
    ids = sample(logits, [row(params, 1), row(params, 2)], seen=seen).token_ids
    assert all(0 <= t < 300 for t in ids)


@pytest.mark.parametrize("all_sampled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_are_not_modified(all_sampled: bool, dtype: torch.dtype) -> None:
    logits = torch.randn(4, 2048, generator=gen(13)).to(dtype)
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.5)
    rows = [row(params, i) if all_sampled or i % 2 else row(GREEDY) for i in range(4)]
    sample(logits, rows, seen=torch.ones(4, 2048, dtype=torch.bool), logprobs=True, top_n=2)
    sample(logits, [row(SamplingParams(temperature=1.0), i) for i in range(4)])
    assert torch.equal(logits, before)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="rows"):
        sample(torch.zeros(2, 10), [row(GREEDY)])
    with pytest.raises(ValueError, match="seen"):
        sample(torch.zeros(1, 10), [row(SamplingParams(repetition_penalty=2.0))], seen=torch.zeros(1, 9))


# ---- seen masks ----


def test_seen_mask_helpers() -> None:
    seen = seen_mask([1, 3, 3, 99], vocab_size=6)  # out-of-range ids are ignored
    assert seen.tolist() == [False, True, False, True, False, False]
    mark_seen(seen, [5])
    assert seen.nonzero().flatten().tolist() == [1, 3, 5]

    batch = torch.zeros(4, 6, dtype=torch.bool)
    mark_seen(batch, [2, 0, 5])  # one token per row, rows 0..2
    mark_seen(batch, torch.tensor([4, 1]), rows=[3, 0])  # or for chosen rows (slots)
    assert batch.nonzero().tolist() == [[0, 1], [0, 2], [1, 0], [2, 5], [3, 4]]
