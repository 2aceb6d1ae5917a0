"""Loading holds one copy of the weights: checkpoint tensors are installed / cast as they are read.

At the real shapes (2B SVLM, 4B LLM) reading every tensor first and converting afterwards held
two or three copies of the weights (8-26 GB). The tiny models reproduce it: count how many of
the tensors read from the checkpoint are still alive when the next one is read.
"""

from __future__ import annotations

import weakref

import pytest

from tempo_ops.svlm import checkpoints


@pytest.fixture
def alive_counter(monkeypatch):
    """Wraps ``checkpoints.iter_tensors``; records the most raw tensors alive at any read."""
    real = checkpoints.iter_tensors
    stats = {"max_alive": 0, "read": 0}

    def counting(*args, **kwargs):
        refs: list[weakref.ref] = []
        for key, tensor in real(*args, **kwargs):
            alive = sum(1 for r in refs if r() is not None)
            stats["max_alive"] = max(stats["max_alive"], alive)
            stats["read"] += 1
            refs.append(weakref.ref(tensor))
            yield key, tensor
            del tensor

    monkeypatch.setattr(checkpoints, "iter_tensors", counting)
    return stats


def test_compressor_installs_tempo_svlm_weights_as_read(tiny_models, alive_counter):
    from tempo_ops.svlm.compressor import Compressor

    comp = Compressor.from_pretrained(tiny_models["svlm"], memory_tokens=tiny_models["tempo"], device="cpu")
    assert comp.memory_tokens_source.endswith("+svlm")
    assert alive_counter["read"] > 10
    assert alive_counter["max_alive"] == 0  # each tensor is gone before the next is read


def test_tempo_llm_casts_each_weight_as_read(tiny_models, alive_counter):
    from tempo_ops.llm.model import TempoLLM

    # reference numerics: float32 → float16 → bfloat16, so no raw tensor needs to survive its cast
    llm = TempoLLM.from_pretrained(tiny_models["tempo"], dtype="bfloat16", device="cpu", numerics="reference")
    assert llm.dtype.is_floating_point and alive_counter["read"] > 10
    assert alive_counter["max_alive"] == 0
