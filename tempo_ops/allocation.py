"""Token allocation: spend a global token budget across the segments of one (video, query).

Every policy maps relevance scores ``(S,)`` and a budget ``B`` (tokens, excluding timestamp
text) to a per-segment token count ``k`` ``(S,) int64`` with ``0 <= k_i <= k_max``; segment
``i`` then keeps ``k_i`` of its ``k_max`` cached candidates (see ``tempo_ops.packing``).
All policies are deterministic and vectorised (no Python loop over segments); the
non-``ata`` policies break ties by segment index.

Policies (``POLICIES``):

- ``ata`` — the reference Adaptive Token Allocation rule, bit for bit (docs/METHOD.md "ATA"):
  the reference's torch CPU float32 operations in its order, so float32 roundings and the
  remainder's tie order (torch's default, unstable ``argsort``; not index order once 17 or
  more weights are compared) are the reference's. Within budget whenever ``S <= B``
  (a remainder that float32 rounding made negative would add nothing, as in the reference;
  not observed). Reference edges reproduced and
  reported by ``allocate_with_report``: with ``S > B`` every segment gets 1 token (over
  budget); with equal scores and ``S > B`` every segment gets 0 tokens (all dropped).
- ``uniform`` — ``floor(B/S)`` each, the remainder ``B mod S`` one token each to the first
  segments, capped at ``k_max``. Ignores ``k_min``. With ``S > B`` the first ``B`` segments
  get 1 token and the rest 0 (never over budget).
- ``proportional`` — a floor of ``k_min' = min(k_min, floor(B/S))`` each, then the rest
  ``B - S*k_min'`` split in proportion to the weights ``w_i = s_i - min(0, min s)`` (uniform
  when all are 0) by largest remainder (ties: lower index first), capped at ``k_max`` with
  the excess handed on to uncapped segments (water-filling). Uses the budget exactly when
  ``S*k_max >= B``, otherwise gives every segment ``k_max``. Never over budget.
- ``topk`` — every segment gets ``k_min' = min(k_min, floor(B/S))``; segments ranked by
  score (descending, ties: lower index first) then receive ``k_max - k_min'`` more each
  until the budget runs out; the segment where it runs out gets what is left (a partial
  top-up), later ones stay at ``k_min'``. Never over budget.
- ``its`` — inverse-transform sampling of ``8*S`` frame slots with probability proportional
  to ``ŝ_i ** alpha`` (``ŝ`` min-max normalised scores, uniform when all scores are equal,
  ``alpha = 3``). Deterministic: the slot quantiles are the evenly spaced ``(j + 0.5)/(8S)``
  instead of random draws, each mapped to the segment whose CDF interval contains it. The
  budget is then split in proportion to slots per segment (largest remainder, water-filled
  at ``k_max``). Ignores ``k_min``: a segment with no slot gets 0 tokens. Never over budget.

``hard_topk_truncate`` implements the reference's hard top-k ablation on top of any
allocation (truncate the lowest-scoring fraction of segments to ``k`` tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tempo_ops.errors import AllocationError

POLICIES: tuple[str, ...] = ("ata", "uniform", "proportional", "topk", "its")
ITS_SLOTS_PER_SEGMENT = 8
ITS_ALPHA = 3.0
_EQUAL_SCORES_EPS = 1e-8  # reference: max - min below this counts as "all scores equal"
_ZERO_SUM_EPS = 1e-8  # reference: sum of normalised scores below this -> uniform weights


@dataclass(frozen=True)
class AllocationReport:
    """What happened inside one allocation (for logs, dead letters and statistics).

    Attributes:
        policy: policy name.
        n_segments: S.
        budget: B (tokens).
        k_min_requested / k_min_effective: the floor asked for and the one used after the
            ``S*k_min > B`` adjustment (the same when no adjustment happened).
        total: sum of the allocation (tokens).
        over_budget: total > budget (only ``ata`` with ``S > B`` does this).
        dropped_segments: number of segments with 0 tokens.
        equal_scores: all scores equal (max - min < 1e-8).
        remainder_step: ``ata`` ran its step 5 (sum exceeded the budget).
        notes: human-readable remarks on edge cases hit (empty when none).
    """

    policy: str
    n_segments: int
    budget: int
    k_min_requested: int
    k_min_effective: int
    total: int
    over_budget: bool
    dropped_segments: int
    equal_scores: bool
    remainder_step: bool
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class AllocationResult:
    """An allocation ``k`` ``(S,) int64`` and its ``report``."""

    k: np.ndarray
    report: AllocationReport


def allocate(
    scores: Any,
    budget: int,
    *,
    policy: str = "ata",
    k_min: int = 4,
    k_max: int = 128,
) -> np.ndarray:
    """Tokens per segment for relevance ``scores`` ``(S,)`` under a ``budget`` (tokens).

    Returns ``(S,) int64`` with ``0 <= k_i <= k_max``. See the module docstring for each
    policy and its edge cases; ``allocate_with_report`` also says when the result is over
    budget or drops segments. Raises ``AllocationError`` for invalid input.
    """
    return allocate_with_report(scores, budget, policy=policy, k_min=k_min, k_max=k_max).k


def allocate_with_report(
    scores: Any,
    budget: int,
    *,
    policy: str = "ata",
    k_min: int = 4,
    k_max: int = 128,
) -> AllocationResult:
    """Like ``allocate`` but also returns an ``AllocationReport`` of the edge cases hit."""
    s = _validate(scores, budget, policy, k_min, k_max)
    budget = int(budget)
    fn = _POLICY_FUNCS[policy]
    k, k_min_eff, equal, remainder_step = fn(s, budget, int(k_min), int(k_max))
    k = np.ascontiguousarray(k, dtype=np.int64)
    total = int(k.sum())
    dropped = int(np.count_nonzero(k == 0))
    notes: list[str] = []
    if total > budget:
        notes.append(f"over budget: {total} tokens for budget {budget} (S={s.size} > B; reference behaviour)")
    if dropped:
        notes.append(f"{dropped} of {s.size} segments get 0 tokens (dropped)")
    if k_min_eff != k_min:
        notes.append(f"k_min lowered from {k_min} to {k_min_eff} because S*k_min > B")
    report = AllocationReport(
        policy=policy,
        n_segments=int(s.size),
        budget=budget,
        k_min_requested=int(k_min),
        k_min_effective=int(k_min_eff),
        total=total,
        over_budget=total > budget,
        dropped_segments=dropped,
        equal_scores=bool(equal),
        remainder_step=bool(remainder_step),
        notes=tuple(notes),
    )
    return AllocationResult(k=k, report=report)


def allocation_stats(
    k: Any, frames_per_segment: int = 8, budget: int | None = None, *, frames: int | None = None
) -> dict[str, Any]:
    """Usage figures of an allocation ``k`` ``(S,)``.

    ``frames``: the video's real number of sampled frames (a short last segment holds
    fewer); default ``S * frames_per_segment``.
    Returns ``tokens`` (sum), ``segments``, ``frames``,
    ``tokens_per_frame`` (tokens actually used per sampled frame), ``dropped_segments``,
    and, when ``budget`` is given, ``budget``, ``budget_share`` (tokens / budget; > 1 means
    over budget; 0 budget → inf when tokens > 0) and ``over_budget``.
    """
    arr = np.asarray(k)
    if arr.ndim != 1:
        raise AllocationError(f"allocation must be 1-D, got shape {arr.shape}", item="allocation")
    if frames_per_segment <= 0:
        raise AllocationError(f"frames_per_segment must be positive, got {frames_per_segment}", item="allocation")
    tokens = int(arr.sum()) if arr.size else 0
    if frames is None:
        frames = int(arr.size) * int(frames_per_segment)
    elif frames < 0:
        raise AllocationError(f"frames must be >= 0, got {frames}", item="allocation")
    out: dict[str, Any] = {
        "tokens": tokens,
        "segments": int(arr.size),
        "frames": frames,
        "tokens_per_frame": tokens / frames if frames else 0.0,
        "dropped_segments": int(np.count_nonzero(arr == 0)),
    }
    if budget is not None:
        if budget < 0:
            raise AllocationError(f"budget must be >= 0, got {budget}", item="allocation")
        out["budget"] = int(budget)
        out["budget_share"] = tokens / budget if budget else (float("inf") if tokens else 0.0)
        out["over_budget"] = tokens > budget
    return out


def hard_topk_truncate(k: Any, scores: Any, *, fraction: float, k_trunc: int = 0) -> np.ndarray:
    """The reference's hard top-k ablation: cap the lowest-scoring segments at ``k_trunc``.

    The ``floor(fraction * S)`` lowest-scoring segments (ranking by score descending with
    ties to the lower index, so among equal scores the higher indices count as lowest) get
    ``min(k_i, k_trunc)`` tokens; ``k_trunc = 0`` drops them. Returns a new ``(S,) int64``.
    """
    k_arr = np.asarray(k, dtype=np.int64)
    s = _validate_scores(scores)
    if k_arr.shape != s.shape:
        raise AllocationError(f"allocation shape {k_arr.shape} != scores shape {s.shape}", item="hard_topk")
    if not 0.0 <= float(fraction) <= 1.0:
        raise AllocationError(f"fraction must be in [0, 1], got {fraction}", item="hard_topk")
    if k_trunc < 0:
        raise AllocationError(f"k_trunc must be >= 0, got {k_trunc}", item="hard_topk")
    n_cut = int(np.floor(float(fraction) * s.size))
    out = k_arr.copy()
    if n_cut:
        order = np.argsort(-s, kind="stable")
        low = order[s.size - n_cut :]
        out[low] = np.minimum(out[low], k_trunc)
    return out


# --------------------------------------------------------------------------- validation
def _validate_scores(scores: Any) -> np.ndarray:
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AllocationError(f"scores are not numeric: {exc}", item="scores") from exc
    if s.ndim != 1:
        raise AllocationError(f"scores must be 1-D (S,), got shape {s.shape}", item="scores")
    if s.size == 0:
        raise AllocationError("scores are empty (no segments)", item="scores")
    if not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise AllocationError(f"scores contain NaN or inf (first at index {bad})", item="scores")
    return s


def _validate(scores: Any, budget: Any, policy: str, k_min: Any, k_max: Any) -> np.ndarray:
    if policy not in _POLICY_FUNCS:
        raise AllocationError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}", item="policy")
    for name, value in (("budget", budget), ("k_min", k_min), ("k_max", k_max)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise AllocationError(f"{name} must be an integer, got {value!r}", item=name)
    if budget < 0:
        raise AllocationError(f"budget must be >= 0, got {budget}", item="budget")
    if k_min < 0:
        raise AllocationError(f"k_min must be >= 0, got {k_min}", item="k_min")
    if k_max < 1:
        raise AllocationError(f"k_max must be >= 1, got {k_max}", item="k_max")
    if k_min > k_max:
        raise AllocationError(f"k_min ({k_min}) > k_max ({k_max})", item="k_min")
    return _validate_scores(scores)


# --------------------------------------------------------------------------- policies
# Each returns (k, k_min_effective, equal_scores, remainder_step_ran).
_PolicyOut = tuple[np.ndarray, int, bool, bool]


def _ata(s64: np.ndarray, budget: int, k_min: int, k_max: int) -> _PolicyOut:
    """The reference rule (docs/METHOD.md "ATA", steps 1-6), bit for bit.

    Every floating-point step is the torch CPU float32 operation the reference calls, in
    the same order (normalised scores, their ``.sum().item()``, ``w = ŝ / float``, the
    floors, and ``torch.argsort(w, descending=True)`` -- torch's default, *unstable*
    sort, which decides ties), so roundings and tie orders are the reference's; only the
    integer bookkeeping is vectorised.
    """
    import torch  # local import: keeps `import tempo_ops.allocation` light for the other policies

    n = s64.size
    s = torch.from_numpy(s64.astype(np.float32))  # == torch.tensor(list_of_floats, dtype=float32)
    # 1. Lower the floor when it alone would exceed the budget.
    if n * k_min > budget:
        k_min = max(1, budget // n)
    lo, hi = s.min(), s.max()
    span = hi - lo
    # 2. All scores equal: an even split, no floor (0 tokens each when S > B: reference edge).
    if bool(span < _EQUAL_SCORES_EPS):
        return np.full(n, min(k_max, budget // n), dtype=np.int64), k_min, True, False
    # 3.-4. Normalise to [0, 1] and interpolate between the floor and k_max. (The floors
    # are taken in numpy: floor is exact, so it equals torch.floor on the same float32s.)
    s_hat = (s - lo) / span
    k = k_min + np.floor((s_hat * (k_max - k_min)).numpy()).astype(np.int64)
    remainder_step = False
    if int(k.sum()) > budget:
        # 5. Share what is left above the floor in proportion to the normalised scores.
        remainder_step = True
        extra = budget - n * k_min
        total_hat = s_hat.sum().item()  # a Python float, as in the reference
        # (Uniform weights for a zero sum: unreachable, the top score normalises to 1.)
        w = torch.full((n,), 1.0 / n) if total_hat < _ZERO_SUM_EPS else s_hat / total_hat
        base = np.floor((w * extra).numpy()).astype(np.int64)
        rem = extra - int(base.sum())
        if rem > 0:  # (rem <= 0, reachable only through float32 rounding, adds nothing)
            order = torch.argsort(w, descending=True).numpy()  # unstable: torch's tie order
            base[order[:rem]] += 1
        k = k_min + base
    # 6. Clamp.
    return np.clip(k, k_min, k_max), k_min, False, remainder_step


def _uniform(s: np.ndarray, budget: int, k_min: int, k_max: int) -> _PolicyOut:
    n = s.size
    k = np.full(n, budget // n, dtype=np.int64)
    k[: budget % n] += 1
    return np.minimum(k, k_max), k_min, False, False


def _effective_floor(n: int, budget: int, k_min: int) -> int:
    return min(k_min, budget // n)


def _proportional(s: np.ndarray, budget: int, k_min: int, k_max: int) -> _PolicyOut:
    n = s.size
    floor_k = _effective_floor(n, budget, k_min)
    w = s - min(0.0, float(s.min()))
    extra = min(budget - n * floor_k, n * (k_max - floor_k))
    k = floor_k + _apportion(w, extra, k_max - floor_k)
    return k, floor_k, bool(np.ptp(s) < _EQUAL_SCORES_EPS), False


def _topk(s: np.ndarray, budget: int, k_min: int, k_max: int) -> _PolicyOut:
    n = s.size
    floor_k = _effective_floor(n, budget, k_min)
    top_up = k_max - floor_k
    extra = budget - n * floor_k
    order = np.argsort(-s, kind="stable")  # highest score first, ties: lower index first
    given = np.clip(extra - np.arange(n, dtype=np.int64) * top_up, 0, top_up)
    k = np.full(n, floor_k, dtype=np.int64)
    k[order] += given
    return k, floor_k, bool(np.ptp(s) < _EQUAL_SCORES_EPS), False


def _its(s: np.ndarray, budget: int, k_min: int, k_max: int) -> _PolicyOut:
    n = s.size
    span = float(s.max() - s.min())
    equal = span < _EQUAL_SCORES_EPS
    p = np.ones(n) if equal else ((s - s.min()) / span) ** ITS_ALPHA
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    n_slots = ITS_SLOTS_PER_SEGMENT * n
    quantiles = (np.arange(n_slots) + 0.5) / n_slots
    # Slot j falls in the first segment whose CDF reaches its quantile.
    seg = np.minimum(np.searchsorted(cdf, quantiles, side="left"), n - 1)
    slots = np.bincount(seg, minlength=n).astype(np.float64)
    k = _apportion(slots, min(budget, n * k_max), k_max)
    return k, 0, equal, False


_POLICY_FUNCS = {"ata": _ata, "uniform": _uniform, "proportional": _proportional, "topk": _topk, "its": _its}


# --------------------------------------------------------------------------- apportioning
def _apportion(weights: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Split ``total`` integer tokens in proportion to ``weights`` (>= 0), each at most ``cap``.

    Water-filling: segments whose share would exceed ``cap`` get exactly ``cap`` and the
    rest is shared among the others; shares are rounded by largest remainder (ties: lower
    index first). Zero weights get tokens only when every positive-weight segment is full
    (then the rest is spread evenly). Requires ``0 <= total <= len(weights) * cap``; the
    result sums to exactly ``total``.
    """
    n = weights.size
    out = np.zeros(n, dtype=np.int64)
    if total <= 0 or cap <= 0:
        return out
    w = np.asarray(weights, dtype=np.float64)
    positive = w > 0
    n_pos = int(positive.sum())
    if n_pos == 0:
        return _apportion(np.ones(n), total, cap)
    if total >= n_pos * cap:
        # Every positive-weight segment is full; the zero-weight ones share what is left.
        out[positive] = cap
        left = total - n_pos * cap
        if left:
            out[~positive] = _apportion(np.ones(n - n_pos), left, cap)
        return out
    # Capped segments form a prefix of the weight-descending order: find its length c, the
    # first position whose share, after capping everything before it, stays below cap.
    order = np.argsort(-w, kind="stable")
    ws = w[order]
    suffix = np.cumsum(ws[::-1])[::-1]
    c_idx = np.arange(n)
    remaining = total - c_idx * cap
    fits = ws * remaining < cap * suffix  # share of position c < cap
    c = int(np.argmax(fits))  # at least one fits: total < n_pos * cap
    capped = order[:c]
    active = order[c:]
    out[capped] = cap
    rest = total - c * cap
    wa = w[active]
    share = wa * (rest / wa.sum())
    base = np.minimum(np.floor(share).astype(np.int64), cap)
    left = rest - int(base.sum())
    if left > 0:
        frac = share - base
        # Largest fractional part first, ties: lower segment index first; only where room is left.
        rank = np.lexsort((active, -frac))
        rank = rank[base[rank] < cap][:left]
        base[rank] += 1
    out[active] = base
    return out
