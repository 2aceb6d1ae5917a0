"""Reference numerics: the bf16 roundings the released model was evaluated with (docs/METHOD.md, "Numerics").

The reference loads its weights in float16, casts the whole model to bf16 and runs it with
transformers 4.57. transformers 5.x computes some small tables in float32 that 4.57 computed
in bf16, and a plain bf16 load rounds the weights once instead of twice. ``numerics="reference"``
reproduces each of these points; ``"exact"`` leaves the model as transformers 5.x runs it.

The pieces (each a plain function, tested against a hand-computed bf16 result):

- ``pass_through_fp16``: weights pass through float16 on load (values below 2^-14 are
  quantised, larger ones rounded to 11 significant bits), then to the run dtype.
- ``round_rope_inv_freq_bf16``: every rotary embedding's ``inv_freq`` buffer rounded to bf16
  (4.57's ``model.to(bf16)`` cast the non-persistent buffers; 5.x keeps them in float32). The
  cos/sin are still computed in float32 from the rounded values, as in 4.57. The LLM stage
  reuses this function for its Qwen3 text rope.
- ``reference_vision_rope_angles``: the vision rope table as a bf16 outer product
  ``bf16(bf16(position) · bf16(inv_freq))``; cos/sin are then taken in bf16.
- ``reference_pos_embed_interpolate``: 4.57's ``fast_pos_embed_interpolate``: bilinear
  weights from ``linspace`` in float32, rounded to bf16, products with the bf16 table rows
  in bf16, and the four terms summed one after the other in bf16.
- ``relevance_direction``: ``w_Yes − w_No`` subtracted in bf16, then applied in float32.

``install_reference_numerics(model)`` applies the rope rounding and hooks the two vision-tower
pieces into a loaded Qwen3-VL model instance (forward hooks on that instance only; the
transformers code is not changed). This module imports only torch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from tempo_ops.errors import ConfigError

REFERENCE = "reference"
EXACT = "exact"
NUMERICS_MODES = (REFERENCE, EXACT)
"""``reference``: reproduce the released model's bf16 run; ``exact``: transformers 5.x as is."""

BF16 = torch.bfloat16


def resolve_numerics(numerics: str | None, dtype: torch.dtype) -> str:
    """The numerics mode to use: ``numerics`` when given, else ``reference`` for bf16 and ``exact`` otherwise.

    Raises:
        ConfigError: an unknown mode.
    """
    if numerics is None:
        return REFERENCE if dtype == BF16 else EXACT
    if numerics not in NUMERICS_MODES:
        raise ConfigError(f"unknown numerics {numerics!r}; known: {', '.join(NUMERICS_MODES)}", item="numerics")
    return numerics


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest bf16 value (round half to even), in ``t``'s dtype."""
    return t.to(BF16).to(t.dtype)


def pass_through_fp16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded through float16 (what a float16 load does to a weight), in ``t``'s dtype."""
    return t.to(torch.float16).to(t.dtype)


def round_rope_inv_freq_bf16(model: torch.nn.Module) -> list[str]:
    """Round every rotary embedding's ``inv_freq`` (and ``original_inv_freq``) buffer of ``model`` to bf16, in place.

    The buffers keep their dtype (float32 in transformers 5.x), so cos/sin stay float32
    computations of the rounded frequencies, as in the reference. Idempotent.

    Returns:
        Names of the modules whose buffers were rounded (e.g. ``"model.language_model.rotary_emb"``).
    """
    done = []
    with torch.no_grad():
        for name, module in model.named_modules():
            inv = getattr(module, "inv_freq", None)
            if not isinstance(inv, torch.Tensor) or not inv.is_floating_point():
                continue
            inv.copy_(bf16_round(inv))
            original = getattr(module, "original_inv_freq", None)
            if isinstance(original, torch.Tensor) and original is not inv and original.is_floating_point():
                original.copy_(bf16_round(original))
            done.append(name)
    return done


def reference_vision_rope_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Vision rope angles as 4.57's bf16 outer-product table: ``(..., F)`` bf16.

    Args:
        position_ids: integer patch coordinates, any shape ``(...)``.
        inv_freq: ``(F,)`` inverse frequencies.
    Returns:
        ``bf16(bf16(p) · bf16(inv_freq))`` (4.57: ``outer(arange(n, dtype=bf16), inv_freq_bf16)[p]``).
    """
    return position_ids.to(BF16)[..., None] * inv_freq.to(BF16)


def reference_pos_embed_interpolate(
    table: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]], num_grid_per_side: int, merge_size: int
) -> torch.Tensor:
    """Learned position embeddings resampled to each grid, exactly as transformers 4.57 in bf16.

    Args:
        table: ``(side², C)`` position-embedding table (rounded to bf16 here).
        grid_thw: ``(n, 3)`` temporal, height, width (in patches) per video.
        num_grid_per_side: ``side`` of the square table.
        merge_size: spatial merge size; rows come out in merge-block order, frames repeated.
    Returns:
        ``(Σ t·h·w, C)`` bf16: per patch ``((p00 + p01) + p10) + p11``, each ``p = bf16(row · bf16(w))``
        with the bilinear weights ``w`` from ``linspace(0, side − 1, h)`` (align corners) in float32.
    """
    rows = table.to(BF16)
    side = int(num_grid_per_side)
    out = []
    for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist():
        h_idx = torch.linspace(0, side - 1, h)
        w_idx = torch.linspace(0, side - 1, w)
        h_floor, w_floor = h_idx.int(), w_idx.int()
        h_ceil, w_ceil = (h_floor + 1).clip(max=side - 1), (w_floor + 1).clip(max=side - 1)
        dh, dw = h_idx - h_floor, w_idx - w_floor
        taps = [
            (h_floor, w_floor, (1 - dh)[:, None] * (1 - dw)[None]),
            (h_floor, w_ceil, (1 - dh)[:, None] * dw[None]),
            (h_ceil, w_floor, dh[:, None] * (1 - dw)[None]),
            (h_ceil, w_ceil, dh[:, None] * dw[None]),
        ]
        total = None
        for hi, wi, weight in taps:
            index = (hi[:, None] * side + wi[None]).flatten().to(rows.device, torch.long)
            term = rows[index] * weight.flatten().to(rows.device, BF16)[:, None]
            total = term if total is None else total + term  # bf16 add: rounded after each term
        grid = total.view(h // merge_size, merge_size, w // merge_size, merge_size, -1).permute(0, 2, 1, 3, 4)
        out.append(grid.reshape(h * w, -1).repeat(t, 1))
    return torch.cat(out)


def relevance_direction(yes_no_rows: torch.Tensor, numerics: str) -> torch.Tensor:
    """``(D,) float32`` direction ``w_Yes − w_No`` of the relevance score.

    ``yes_no_rows``: ``(2, D)`` LM-head rows of "Yes" and "No". In ``reference`` numerics the
    rows are rounded to bf16 and subtracted in bf16 (the reference's bf16 LM head); in
    ``exact`` they are subtracted in float32.
    """
    rows = yes_no_rows.detach()
    if numerics == REFERENCE:
        return (rows[0].to(BF16) - rows[1].to(BF16)).float()
    return rows[0].float() - rows[1].float()


class _VisionHooks:
    """Forward hooks putting the reference vision rope and position embeddings into a Qwen3-VL vision tower.

    transformers 5.x sums the interpolated position embeddings inside the vision forward; the
    pre-hook hands it zero taps (so it adds exact zeros) and keeps the grid, and the hook on
    ``patch_embed`` adds the reference bf16 embeddings to its output instead — the same
    ``patch + pos`` addition 4.57 does. The grid is kept per thread (models are shared by threads).
    """

    def __init__(self, visual: Any) -> None:
        self.visual = visual
        self.local = threading.local()
        self.handles = [
            visual.register_forward_pre_hook(self.before_forward, with_kwargs=True),
            visual.patch_embed.register_forward_hook(self.add_position_embeddings),
            visual.rotary_pos_emb.register_forward_hook(self.rope),
        ]

    def before_forward(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise ConfigError("reference numerics: the vision tower was called without grid_thw", item="numerics")
        n = int(torch.as_tensor(grid).prod(dim=-1).sum())
        weight = module.pos_embed.weight
        kwargs = dict(kwargs)
        kwargs["interp_indices"] = torch.zeros((n, 1), dtype=torch.long, device=weight.device)
        kwargs["interp_weights"] = torch.zeros((n, 1), dtype=weight.dtype, device=weight.device)
        self.local.grid = grid
        return args, kwargs

    def add_position_embeddings(self, module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        grid = getattr(self.local, "grid", None)
        if grid is None:  # patch_embed called on its own, outside a vision forward: left as is
            return output
        self.local.grid = None
        v = self.visual
        pos = reference_pos_embed_interpolate(v.pos_embed.weight, grid, v.num_grid_per_side, v.spatial_merge_size)
        return output + pos.to(output.dtype)

    @staticmethod
    def rope(module: Any, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        angles = reference_vision_rope_angles(args[1], module.inv_freq)
        cos, sin = angles.cos(), angles.sin()  # in bf16, as 4.57's emb.cos() / emb.sin()
        return (
            module.recomposition_frequencies(cos).to(output[0].dtype),
            module.recomposition_frequencies(sin).to(output[1].dtype),
        )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def install_reference_numerics(model: Any) -> _VisionHooks:
    """Apply reference numerics to a loaded Qwen3-VL model instance (dense or MoE), in place.

    Rounds every rope ``inv_freq`` to bf16 and hooks the vision tower (``model.model.visual``)
    so that its rope table and position-embedding interpolation run as 4.57's bf16 code. The
    weights themselves are not touched (``pass_through_fp16`` is applied on load).

    Returns:
        The hooks object (``.remove()`` takes the vision hooks off again; the rounding stays).
    """
    round_rope_inv_freq_bf16(model)
    visual = model.model.visual
    for attr in ("pos_embed", "patch_embed", "rotary_pos_emb", "num_grid_per_side", "spatial_merge_size"):
        if not hasattr(visual, attr):
            raise ConfigError(f"reference numerics: the vision tower has no {attr!r} (unsupported transformers version)", item="numerics")
    return _VisionHooks(visual)
