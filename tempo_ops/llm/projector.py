"""The multimodal projector: SVLM candidate tokens ``(T, D_svlm)`` → LLM embeddings ``(T, D_llm)``.

Types (config field ``mm_projector_type``, docs/METHOD.md "LLM stage"):

- ``"linear"``: ``Linear(D_svlm → D_llm)``; tensors ``model.mm_projector.{weight,bias}``.
- ``"mlp{N}x_gelu"`` (N ≥ 1): ``Linear(D_svlm → D_llm)`` then (N−1) × [exact GELU,
  ``Linear(D_llm → D_llm)``], as an ``nn.Sequential``; tensors
  ``model.mm_projector.{0,2,4,...}.{weight,bias}``.
- ``"identity"``: no tensors; needs D_svlm == D_llm.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tempo_ops.errors import CheckpointFormatError

PROJECTOR_PREFIX = "model.mm_projector."
_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int, *, item: str = "mm_projector") -> nn.Module:
    """A freshly initialised projector module of ``projector_type`` (see the module docstring).

    Raises ``CheckpointFormatError`` for an unknown type or an identity between different widths.
    """
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise CheckpointFormatError(
                f"identity projector needs mm_hidden_size == hidden_size, got {mm_hidden_size} and {hidden_size}", item=item
            )
        return nn.Identity()
    m = _MLP_RE.match(str(projector_type))
    if m and int(m.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(int(m.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    raise CheckpointFormatError(
        f"unknown mm_projector_type {projector_type!r} (known: linear, mlp{{N}}x_gelu, identity)", item=item
    )


def projector_state_keys(module: nn.Module) -> list[str]:
    """Checkpoint tensor names of a projector module (``model.mm_projector.`` + its state-dict names)."""
    return sorted(PROJECTOR_PREFIX + k for k in module.state_dict())


def load_projector(
    projector_type: str,
    mm_hidden_size: int,
    hidden_size: int,
    tensors: dict[str, torch.Tensor],
    *,
    item: str,
) -> nn.Module:
    """Build a projector and install ``tensors`` (checkpoint names → tensors; exactly its keys, equal shapes)."""
    module = build_projector(projector_type, mm_hidden_size, hidden_size, item=item)
    state = {}
    expected = module.state_dict()
    for name, ref in expected.items():
        key = PROJECTOR_PREFIX + name
        if key not in tensors:
            raise CheckpointFormatError(f"projector tensor {key} missing", item=item)
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise CheckpointFormatError(
                f"{key} has shape {tuple(tensors[key].shape)}, {projector_type} expects {tuple(ref.shape)}", item=item
            )
        state[name] = tensors[key]
    module.load_state_dict(state, strict=True, assign=True)
    return module
