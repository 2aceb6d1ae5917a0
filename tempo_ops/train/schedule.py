"""Learning-rate schedule: linear warmup then cosine decay (a multiplier of the peak rate)."""

from __future__ import annotations

import math

from tempo_ops.errors import ConfigError


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor applied *during* optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then cosine from 1
    towards ``min_ratio``: ``min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * p))`` with
    ``p = (step - warmup) / (total - warmup)`` (as transformers' cosine schedule: the last
    step still has a positive rate; ``min_ratio`` is reached one step after the end).
    """
    if total_steps < 1 or warmup_steps < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(
            f"bad schedule: total_steps={total_steps}, warmup_steps={warmup_steps}, min_ratio={min_ratio}", item="schedule"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
