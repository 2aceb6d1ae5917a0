"""Greedy generation: batched with left padding equals batch-of-one; stop rules; token limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tempo_ops.errors import ConfigError
from tempo_ops.llm import TempoLLM
from tempo_ops.query_text import render_query


@pytest.fixture(scope="module")
def llm(tiny_models) -> TempoLLM:
    return TempoLLM.from_pretrained(tiny_models["tempo"], device="cpu")


def _batch(llm, n=6):
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        S = 1 + i % 4
        alloc = rng.integers(0, 9, size=S)
        tokens = rng.standard_normal((int(alloc.sum()), 64)).astype(np.float16)
        times = [f"<{(8 * j + 4) / 2:.1f} seconds>" for j in range(S)]
        ctx = render_query(f"Question {i}: what happens?" + " more" * i, ["a", "b", "c"], "lvbench")
        out.append(llm.build_inputs(tokens, alloc, times, ctx))
    return out


def test_batched_equals_batch_of_one(llm):
    batch = _batch(llm)
    assert len({x.prompt_length for x in batch}) > 1  # real left padding happens
    together = llm.generate(batch, max_new_tokens=12)
    alone = [llm.generate([x], max_new_tokens=12)[0] for x in batch]
    assert together == alone
    assert all(len(g.token_ids) == 12 or g.stopped for g in together)


def test_prefill_logits_match_unpadded(llm):
    batch = _batch(llm, 3)
    L = max(x.prompt_length for x in batch)
    emb = torch.zeros((3, L, llm.hidden_size))
    mask = torch.zeros((3, L), dtype=torch.int64)
    for b, x in enumerate(batch):
        emb[b, L - x.length :] = x.inputs_embeds
        mask[b, L - x.length :] = 1
    with torch.inference_mode():
        padded = llm.lm(inputs_embeds=emb, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        for b, x in enumerate(batch):
            single = llm.lm(inputs_embeds=x.inputs_embeds[None]).logits[0]
            assert torch.isfinite(padded[b]).all()
            torch.testing.assert_close(padded[b, L - x.length :], single, rtol=1e-4, atol=1e-5)


def test_stop_tokens_end_an_answer(llm, monkeypatch):
    (x,) = _batch(llm, 1)
    (free,) = llm.generate([x], max_new_tokens=6)
    assert not free.stopped and len(free.token_ids) == 6
    # Declare the third generated token a stop token: the answer is the first two, marked stopped.
    monkeypatch.setattr(llm, "stop_ids", frozenset({free.token_ids[2]}) | llm.stop_ids)
    (cut,) = llm.generate([x], max_new_tokens=6)
    first = free.token_ids.index(free.token_ids[2])
    assert cut.token_ids == free.token_ids[:first] and cut.stopped
    assert cut.text == llm.tokenizer.decode(free.token_ids[:first], skip_special_tokens=True).strip()
    # In a batch, a stopped sample does not change the others.
    (y,) = _batch(llm, 1)
    both = llm.generate([x, _batch(llm, 2)[1]], max_new_tokens=6)
    assert both[0] == cut and both[1] == llm.generate([_batch(llm, 2)[1]], max_new_tokens=6)[0]
    assert y.length == x.length


def test_token_limit_and_bad_arguments(llm):
    (x,) = _batch(llm, 1)
    assert len(llm.generate([x], max_new_tokens=1)[0].token_ids) <= 1
    assert llm.generate([], max_new_tokens=4) == []
    with pytest.raises(ConfigError):
        llm.generate([x], max_new_tokens=0)
