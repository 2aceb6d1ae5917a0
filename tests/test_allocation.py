"""Token allocation policies: exact reference values, properties, invalid input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo_ops.allocation import (
    POLICIES,
    allocate,
    allocate_with_report,
    allocation_stats,
    hard_topk_truncate,
)
from tempo_ops.errors import AllocationError


def reference_ata_torch(scores, budget, k_min=4, k_max=128, *, stable=False):
    """The reference rule transcribed literally: torch CPU float32 tensor ops, plain loops (oracle).

    docs/METHOD.md "ATA" step 5: scores as a float32 tensor, ŝ with tensor operands, Σŝ
    via ``.sum().item()``, ``w = ŝ / python float``, ``floor(w * E)`` with ``E`` a Python
    int, the remainder handed out in ``torch.argsort(w, descending=True)`` order (the
    default, unstable sort). ``stable=True`` is the index-order variant, only to show that
    the test inputs really contain ties the two orders resolve differently.
    """
    s = torch.tensor(list(scores), dtype=torch.float32)
    n = len(s)
    if n * k_min > budget:
        k_min = max(1, budget // n)
    if s.max() - s.min() < 1e-8:
        return [min(k_max, budget // n)] * n
    s_hat = (s - s.min()) / (s.max() - s.min())
    k = [k_min + int(torch.floor(s_hat[i] * (k_max - k_min))) for i in range(n)]
    if sum(k) > budget:
        extra = budget - n * k_min
        total = s_hat.sum().item()
        w = torch.ones(n) / n if total < 1e-8 else s_hat / total
        base = [int(torch.floor(w[i] * extra)) for i in range(n)]
        order = torch.argsort(w, descending=True, stable=True) if stable else torch.argsort(w, descending=True)
        for j in range(extra - sum(base)):
            base[int(order[j])] += 1
        k = [k_min + b for b in base]
    return [min(max(x, k_min), k_max) for x in k]


# --------------------------------------------------------------------------- ata, by hand
def test_ata_no_remainder_step():
    # ŝ = [0, .5, 1]; k = 4 + floor(ŝ * 124) = [4, 4+62, 4+124]; sum 198 <= 1000: done.
    res = allocate_with_report([0.0, 0.5, 1.0], 1000)
    assert res.k.tolist() == [4, 66, 128]
    assert res.k.dtype == np.int64
    assert not res.report.remainder_step and not res.report.over_budget


def test_ata_remainder_step_exact():
    # Same scores, B = 150: sum 198 > 150 -> E = 150 - 12 = 138, w = ŝ/1.5 = [0, 1/3, 2/3],
    # floor(w*E) = [0, 46, 92] (float32), remainder 0 -> k = [4, 50, 96], sum 150.
    res = allocate_with_report([0.0, 0.5, 1.0], 150)
    assert res.k.tolist() == [4, 50, 96]
    assert res.report.remainder_step and res.report.total == 150


def test_ata_remainder_ties_short_lists_in_index_order():
    # ŝ = [1, 1, 1, 0], B = 18: 4+124 each > 18 -> E = 18 - 16 = 2, w = 1/3 each for the
    # first three, floor(w*2) = 0, R = 2 -> the first two of torch.argsort(w, descending=True),
    # which for fewer than 17 elements (insertion sort) keeps tied weights in index order.
    assert allocate([0.9, 0.9, 0.9, 0.1], 18).tolist() == [5, 5, 4, 4]
    # ŝ = [1, 1, 0, .5], B = 20: E = 4, w = [.4, .4, 0, .2], floors [1, 1, 0, 0], R = 2
    # -> the two 0.4s (indices 0, 1) get one more: [4+2, 4+2, 4, 4].
    assert allocate([1.0, 1.0, 0.0, 0.5], 20).tolist() == [6, 6, 4, 4]


def test_ata_remainder_ties_follow_torchs_unstable_sort():
    # 20 tied top scores and one low one, B = 89: k_min 4, E = 89 - 84 = 5, w = 0.05 for the
    # twenty (float32), floor(0.05 * 5) = 0, R = 5. torch.argsort(w, descending=True) (the
    # reference's default, unstable sort) orders the tied twenty 1, 19, 18, 17, 16, ...: those
    # five get the extra token, not segments 0-4 as an index-order tie rule would give.
    k = allocate([1.0] * 20 + [0.0], 89)
    assert k.tolist() == [4, 5] + [4] * 14 + [5, 5, 5, 5] + [4]
    assert k.tolist() == reference_ata_torch([1.0] * 20 + [0.0], 89)
    assert k.tolist() != reference_ata_torch([1.0] * 20 + [0.0], 89, stable=True)


def test_ata_lowered_floor_when_s_times_kmin_exceeds_budget():
    # S = 10, B = 25: 10*4 > 25 -> k_min = max(1, 25 // 10) = 2; alternating ŝ 0/1; E = 5,
    # w = 0.2 on the five 1s, floor(0.2*5) = 1 -> [2, 3, 2, 3, ...], sum 25.
    res = allocate_with_report([0.0, 1.0] * 5, 25)
    assert res.k.tolist() == [2, 3] * 5
    assert res.report.k_min_effective == 2 and res.report.k_min_requested == 4
    assert res.report.total == 25


def test_ata_equal_scores():
    # max - min < 1e-8 -> min(k_max, B // S) each.
    assert allocate([0.3, 0.3, 0.3], 100).tolist() == [33, 33, 33]
    assert allocate([0.3, 0.3 + 1e-9], 10_000).tolist() == [128, 128]
    res = allocate_with_report([0.7] * 5, 3)  # reference edge: S > B -> 0 each, all dropped
    assert res.k.tolist() == [0] * 5
    assert res.report.dropped_segments == 5 and res.report.equal_scores and not res.report.over_budget


def test_ata_more_segments_than_budget_is_reported_over_budget():
    res = allocate_with_report([0.0, 0.25, 0.5, 0.75, 1.0], 3)
    assert res.k.tolist() == [1] * 5  # reference edge: 1 token each, exceeds B
    assert res.report.over_budget and res.report.total == 5
    assert any("over budget" in n for n in res.report.notes)
    stats = allocation_stats(res.k, budget=3)
    assert stats["over_budget"] and stats["budget_share"] == pytest.approx(5 / 3)


def test_ata_budget_zero():
    assert allocate([0.1, 0.9], 0).tolist() == [1, 1]  # k_min -> max(1, 0) = 1: over budget
    assert allocate([0.5, 0.5], 0).tolist() == [0, 0]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=1, max_size=40),
    st.integers(0, 6000),
    st.integers(0, 16),
    st.integers(16, 160),
)
def test_ata_matches_torch_reference(scores, budget, k_min, k_max):
    got = allocate(scores, budget, k_min=k_min, k_max=k_max).tolist()
    assert got == reference_ata_torch(scores, budget, k_min, k_max)


def _random_ata_case(rng: np.random.Generator) -> tuple[list[float], int, int, int]:
    """One random ATA input, mostly with ties: quantised, equal, or plain random scores."""
    n = int(rng.choice([1, 2, 3, 5, 16, 17, 18, 24, 33, 64, 100, 257]))
    kind = rng.integers(0, 6)
    if kind == 0:  # plain float32 scores
        scores = rng.random(n).astype(np.float32)
    elif kind == 1:  # few distinct levels: many tied weights
        q = int(rng.integers(1, 5))
        scores = rng.integers(0, q + 1, n) / q
    elif kind == 2:  # two levels, the top one shared by many segments
        scores = (rng.random(n) < rng.uniform(0.2, 0.9)).astype(np.float64)
    elif kind == 3:  # all equal (or equal within 1e-8)
        scores = np.full(n, rng.random()) + rng.choice([0.0, 1e-9], n)
    elif kind == 4:  # sigmoid outputs rounded to 3 decimals (ties among real scores)
        scores = np.round(1 / (1 + np.exp(-rng.normal(0, 3, n))), 3)
    else:  # tiny spreads: float32 rounding decides the normalised values
        scores = 0.5 + rng.integers(0, 4, n) * rng.choice([1e-7, 3e-8, 1e-3])
    # Budgets from far below S (S > B edges) to above S * k_max.
    budget = int(rng.choice([rng.integers(0, n + 1), rng.integers(n, 8 * n + 1), rng.integers(0, 140 * n + 1)]))
    k_min = int(rng.choice([0, 1, 4, 4, 4, 8]))
    k_max = int(rng.choice([16, 64, 128, 128, 128]))
    return [float(x) for x in scores], budget, k_min, max(k_max, k_min)


def test_ata_bit_identical_to_reference_on_thousands_of_tie_heavy_inputs():
    rng = np.random.default_rng(20261202)
    unstable_matters = remainder_steps = over_budget = 0
    for _ in range(3000):
        scores, budget, k_min, k_max = _random_ata_case(rng)
        res = allocate_with_report(scores, budget, k_min=k_min, k_max=k_max)
        expected = reference_ata_torch(scores, budget, k_min, k_max)
        assert res.k.tolist() == expected, (scores, budget, k_min, k_max)
        unstable_matters += expected != reference_ata_torch(scores, budget, k_min, k_max, stable=True)
        remainder_steps += res.report.remainder_step
        over_budget += res.report.over_budget
    # The inputs really exercise the tie order, step 5 and the S > B edge.
    assert unstable_matters >= 100 and remainder_steps >= 1000 and over_budget >= 50


def test_ata_matches_reference_on_realistic_sizes():
    rng = np.random.default_rng(0)
    for n, budget in [(128, 4096), (512, 8192), (1024, 4096), (300, 1000), (2048, 8192)]:
        scores = rng.random(n).astype(np.float32).tolist()
        assert allocate(scores, budget).tolist() == reference_ata_torch(scores, budget)
        quantised = np.round(np.asarray(scores), 2).tolist()  # sigmoid scores to 2 decimals: ties
        assert allocate(quantised, budget).tolist() == reference_ata_torch(quantised, budget)


# --------------------------------------------------------------------------- other policies, by hand
def test_uniform_exact():
    assert allocate([0.1, 0.9, 0.5], 10, policy="uniform").tolist() == [4, 3, 3]
    assert allocate([0.1] * 4, 1000, policy="uniform").tolist() == [128] * 4
    assert allocate([0.1] * 5, 3, policy="uniform").tolist() == [1, 1, 1, 0, 0]


def test_proportional_exact_and_water_filling():
    # floor 4 each, E = 100 - 12 = 88 split 1:1:2 -> 22, 22, 44 -> [26, 26, 48].
    assert allocate([0.25, 0.25, 0.5], 100, policy="proportional").tolist() == [26, 26, 48]
    # k_max = 20: floor 4, E = 40; shares 10, 10, 20 -> third capped at 16, its excess 4
    # is shared by the others -> [4+12, 4+12, 20].
    assert allocate([0.25, 0.25, 0.5], 52, policy="proportional", k_max=20).tolist() == [16, 16, 20]
    # largest remainder, ties to lower index: E = 88 - ... 3 equal weights, E = 10 -> 4, 3, 3.
    assert allocate([1.0, 1.0, 1.0], 22, policy="proportional").tolist() == [8, 7, 7]
    # zero weights get tokens only once the positive ones are full.
    assert allocate([0.0, 1.0], 200, policy="proportional").tolist() == [72, 128]


def test_topk_exact():
    # floor 4 each; ranking 1 > 2 > 0 ; E = 300 - 12 = 288: +124 to seg 1, +124 to seg 2,
    # the remaining 40 to seg 0 (where the budget runs out).
    assert allocate([0.1, 0.9, 0.5], 300, policy="topk").tolist() == [44, 128, 128]
    assert allocate([0.1, 0.9, 0.5], 100, policy="topk").tolist() == [4, 92, 4]
    # ties: lower index first; E = 140 - 12 = 128 -> +124 to seg 0, the last 4 to seg 1.
    assert allocate([0.5, 0.5, 0.5], 140, policy="topk").tolist() == [128, 8, 4]
    # S * k_min > B: floor min(4, 10 // 5) = 2 each, nothing left for the top-up.
    assert allocate([0.1, 0.9, 0.5, 0.2, 0.3], 10, policy="topk").tolist() == [2] * 5


def test_its_exact():
    # Equal scores: 8 slots each -> even split.
    assert allocate([0.2, 0.2], 50, policy="its").tolist() == [25, 25]
    # ŝ = [0, 1]: all 16 slots fall in segment 1 -> it gets min(B, k_max).
    assert allocate([0.0, 1.0], 50, policy="its").tolist() == [0, 50]
    # ŝ = [0, .5, 1] -> p ∝ [0, 1/8, 1] -> CDF [0, 1/9, 1]; quantiles (j+.5)/24 for
    # j = 0, 1, 2 (0.021, 0.063, 0.104) are <= 1/9 -> 3 slots in seg 1, 21 in seg 2.
    # B=240 -> 30, 210 -> seg 2 capped at 128, water-fill: seg 1 = 112. B=120 -> 15, 105.
    assert allocate([0.0, 0.5, 1.0], 240, policy="its").tolist() == [0, 112, 128]
    assert allocate([0.0, 0.5, 1.0], 120, policy="its").tolist() == [0, 15, 105]


def test_hard_topk_truncate():
    k = np.array([10, 20, 30, 40])
    scores = [0.9, 0.1, 0.5, 0.1]
    # floor(0.5 * 4) = 2 lowest: ties at 0.1 -> index 3 ranks last, index 1 before it.
    assert hard_topk_truncate(k, scores, fraction=0.5, k_trunc=0).tolist() == [10, 0, 30, 0]
    assert hard_topk_truncate(k, scores, fraction=0.25, k_trunc=5).tolist() == [10, 20, 30, 5]
    assert hard_topk_truncate(k, scores, fraction=0.0).tolist() == [10, 20, 30, 40]
    with pytest.raises(AllocationError):
        hard_topk_truncate(k, scores, fraction=1.5)


# --------------------------------------------------------------------------- properties
scores_st = st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=1, max_size=64)


@settings(max_examples=120, deadline=None)
@given(scores_st, st.integers(0, 20000), st.integers(0, 8), st.integers(8, 130), st.sampled_from(POLICIES))
def test_policy_properties(scores, budget, k_min, k_max, policy):
    res = allocate_with_report(scores, budget, policy=policy, k_min=k_min, k_max=k_max)
    k = res.k
    assert k.shape == (len(scores),) and k.dtype == np.int64
    assert (k >= 0).all() and (k <= k_max).all()
    if len(scores) <= budget or policy != "ata":
        assert k.sum() <= budget
    assert res.report.over_budget == (k.sum() > budget)
    again = allocate(list(scores), budget, policy=policy, k_min=k_min, k_max=k_max)
    assert np.array_equal(k, again)
    if policy in ("proportional", "its", "uniform"):
        assert k.sum() == min(budget, len(scores) * k_max)  # uses the whole budget when it can
    if policy == "topk":
        assert k.sum() == min(budget, len(scores) * k_max)


@settings(max_examples=80, deadline=None)
@given(scores_st, st.integers(0, 20000), st.sampled_from(["ata", "proportional", "topk"]))
def test_higher_score_never_gets_fewer_tokens(scores, budget, policy):
    # Monotone in the score wherever ties do not decide (equal scores may differ by rounding).
    k = allocate(scores, budget, policy=policy)
    s = np.asarray(scores, dtype=np.float32)
    # The policies rank by the float32 min-max normalised score (as the reference does), so
    # scores that differ by less than float32 resolution after normalising are ties, e.g.
    # 0.0 vs 2.2e-16 next to -1.0; ties are then broken by index.
    span = np.float32(s.max() - s.min())
    if span > 0:
        s = ((s - s.min()) / span).astype(np.float32)
    order = np.argsort(s, kind="stable")
    s_sorted, k_sorted = s[order], k[order]
    strictly_higher = s_sorted[1:] > s_sorted[:-1]
    if policy == "proportional":  # largest remainder may give one token to a lower score
        assert (k_sorted[1:][strictly_higher] >= k_sorted[:-1][strictly_higher] - 1).all()
    else:
        assert (k_sorted[1:][strictly_higher] >= k_sorted[:-1][strictly_higher]).all()


@settings(max_examples=80, deadline=None)
@given(scores_st, st.integers(0, 20000))
def test_its_gives_the_best_segment_the_most_tokens(scores, budget):
    # ITS is monotone only in expectation: it reads the CDF at fixed quantiles, so a low-mass
    # segment can take a slot ahead of a slightly better neighbour (and water-filling then hands
    # it the capped segments' excess). What holds per allocation: the top-scoring segment gets
    # at least as many tokens as any other, up to one slot (budget/(8S) tokens) of rounding.
    k = allocate(scores, budget, policy="its")
    slot = int(np.ceil(budget / (8 * len(scores))))
    assert k[int(np.argmax(scores))] >= k.max() - slot - 1


@settings(max_examples=60, deadline=None)
@given(scores_st, st.integers(1, 4000))
def test_proportional_budget_monotone(scores, budget):
    # More budget never gives any segment fewer tokens beyond one token of rounding.
    a = allocate(scores, budget, policy="proportional")
    b = allocate(scores, budget + 50, policy="proportional")
    assert b.sum() >= a.sum()


# --------------------------------------------------------------------------- invalid input
@pytest.mark.parametrize(
    ("scores", "budget", "kw", "needle"),
    [
        ([0.1, float("nan")], 100, {}, "NaN"),
        ([0.1, float("inf")], 100, {}, "NaN or inf"),
        ([], 100, {}, "empty"),
        ([[0.1, 0.2]], 100, {}, "1-D"),
        (np.float32(0.5), 100, {}, "1-D"),
        ([0.1], -1, {}, "budget"),
        ([0.1], 10, {"k_min": 9, "k_max": 8}, "k_min"),
        ([0.1], 10, {"k_min": -1}, "k_min"),
        ([0.1], 10, {"k_max": 0}, "k_max"),
        ([0.1], 10.5, {}, "integer"),
        ([0.1], 10, {"policy": "random"}, "unknown policy"),
        (["a", "b"], 10, {}, "numeric"),
    ],
)
def test_invalid_inputs(scores, budget, kw, needle):
    with pytest.raises(AllocationError, match=needle) as info:
        allocate(scores, budget, **kw)
    assert info.value.code == "invalid_allocation_input"


def test_allocation_stats():
    stats = allocation_stats(np.array([4, 0, 12]), frames_per_segment=8, budget=32)
    assert stats == {
        "tokens": 16,
        "segments": 3,
        "frames": 24,
        "tokens_per_frame": 16 / 24,
        "dropped_segments": 1,
        "budget": 32,
        "budget_share": 0.5,
        "over_budget": False,
    }
    with pytest.raises(AllocationError):
        allocation_stats(np.zeros((2, 2)))
