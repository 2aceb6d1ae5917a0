"""LLM stage input construction: exact sequence around the placeholder, timestamps, order, drops, truncation, labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tempo_ops.errors import LLMInputError
from tempo_ops.llm import IGNORE_INDEX, TempoLLM
from tempo_ops.llm.model import VISUAL_TOKEN_ID
from tempo_ops.query_text import render_query

TIMES = ["<2.0 seconds>", "<6.0 seconds>", "<10.0 seconds>", "<14.0 seconds>"]
CONTEXT = render_query("What is added first?", ["salt", "oil"], "videomme")


@pytest.fixture(scope="module")
def llm(tiny_models) -> TempoLLM:
    return TempoLLM.from_pretrained(tiny_models["tempo"], device="cpu")


def _ids(llm: TempoLLM, text: str) -> list[int]:
    return list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokens(alloc, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((int(np.sum(alloc)), 64)).astype(np.float16)


def test_exact_ids_around_the_placeholder(llm):
    alloc = np.array([2, 3])
    x = llm.build_inputs(_tokens(alloc), alloc, TIMES[:2], CONTEXT)
    pre = _ids(llm, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    post = _ids(llm, "\n" + CONTEXT + "<|im_end|>\n<|im_start|>assistant\n")
    ts = [_ids(llm, t) for t in TIMES[:2]]
    expected = pre + ts[0] + [VISUAL_TOKEN_ID] * 2 + ts[1] + [VISUAL_TOKEN_ID] * 3 + post
    assert x.input_ids.tolist() == expected
    im_start, im_end = llm.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    nl = _ids(llm, "\n")
    assert len(nl) == 1
    # The token right before the visual sequence is the "\n" after "user"; right after it the "\n" before the context.
    user = _ids(llm, "<|im_start|>user\n")
    header = _ids(llm, "<|im_start|>assistant\n")
    assert pre[0] == im_start and pre[-len(user):] == user and user[-1] == nl[0]
    assert x.input_ids[x.prefix_length + x.visual_length].item() == nl[0]
    assert post[-len(header):] == header and post[-len(header) - 2 : -len(header)] == [im_end, nl[0]]
    assert x.prefix_length == len(pre) and x.visual_length == sum(map(len, ts)) + 5
    assert x.prompt_length == x.length == len(expected)
    assert x.visual_tokens == 5 and x.segments_kept == 2 and x.truncated == 0
    assert x.visual_mask.tolist() == [False] * len(pre) + [True] * x.visual_length + [False] * len(post)
    assert x.attention_mask.tolist() == [1] * x.length
    assert (x.labels == IGNORE_INDEX).all()


def test_embeddings_are_embed_tokens_and_projected_tokens(llm):
    alloc = np.array([1, 0, 4, 2])
    tokens = _tokens(alloc, seed=3)
    x = llm.build_inputs(tokens, alloc, TIMES, CONTEXT)
    table = llm.lm.get_input_embeddings().weight
    ids = x.input_ids
    text = ids != VISUAL_TOKEN_ID
    assert torch.equal(x.inputs_embeds[text], table[ids[text]])
    projected = llm.projector(torch.from_numpy(tokens).float())
    assert torch.equal(x.inputs_embeds[~text], projected)
    # Timestamps: the LLM's own embedding of each kept segment's "<t seconds>" ids, in time order, just before its tokens.
    pos = x.prefix_length
    for i in (0, 2, 3):
        ts = _ids(llm, TIMES[i])
        assert ids[pos : pos + len(ts)].tolist() == ts
        assert torch.equal(x.inputs_embeds[pos : pos + len(ts)], table[torch.tensor(ts)])
        pos += len(ts)
        start = int(np.sum(alloc[:i]))
        assert torch.equal(x.inputs_embeds[pos : pos + alloc[i]], projected[start : start + alloc[i]])
        pos += int(alloc[i])
    assert pos == x.prefix_length + x.visual_length


def test_dropped_segments_lose_their_timestamp(llm):
    alloc = np.array([0, 3, 0, 1])
    x = llm.build_inputs(_tokens(alloc), alloc, TIMES, CONTEXT)
    visual = x.input_ids[x.prefix_length : x.prefix_length + x.visual_length].tolist()
    expected = _ids(llm, TIMES[1]) + [VISUAL_TOKEN_ID] * 3 + _ids(llm, TIMES[3]) + [VISUAL_TOKEN_ID]
    assert visual == expected
    assert x.segments_kept == 2 and x.visual_tokens == 4


def test_every_segment_at_zero_answers_from_text_alone(llm):
    alloc = np.zeros(4, dtype=np.int64)
    x = llm.build_inputs(np.zeros((0, 64), np.float16), alloc, TIMES, CONTEXT)
    assert x.visual_length == 0 and x.segments_kept == 0 and x.visual_tokens == 0
    assert x.input_ids.tolist() == _ids(llm, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n") + _ids(
        llm, "\n" + CONTEXT + "<|im_end|>\n<|im_start|>assistant\n"
    )
    (g,) = llm.generate([x], max_new_tokens=3)
    assert len(g.token_ids) <= 3


def test_truncation_cuts_the_visual_tail(llm, monkeypatch):
    alloc = np.array([4, 4, 4])
    tokens = _tokens(alloc)
    full = llm.build_inputs(tokens, alloc, TIMES[:3], CONTEXT)
    text_len = full.length - full.visual_length
    ts0 = len(_ids(llm, TIMES[0]))
    room = ts0 + 4 + 2  # first segment whole, then 2 positions of the second segment's timestamp
    monkeypatch.setattr(llm, "max_length", text_len + 16 + room)
    cut = llm.build_inputs(tokens, alloc, TIMES[:3], CONTEXT)
    assert cut.visual_length == room and cut.truncated == full.visual_length - room
    assert cut.length == llm.max_length - 16
    assert cut.input_ids.tolist() == full.input_ids[: full.prefix_length + room].tolist() + full.input_ids[
        full.prefix_length + full.visual_length :
    ].tolist()
    assert cut.visual_tokens == 4 and cut.segments_kept == 2
    assert torch.equal(cut.inputs_embeds[: cut.prefix_length + room], full.inputs_embeds[: full.prefix_length + room])
    # Cutting inside the token run keeps its first tokens.
    monkeypatch.setattr(llm, "max_length", text_len + 16 + ts0 + 3)
    part = llm.build_inputs(tokens, alloc, TIMES[:3], CONTEXT)
    assert part.visual_tokens == 3 and part.segments_kept == 1
    # The text alone does not fit: a typed error.
    monkeypatch.setattr(llm, "max_length", text_len + 15)
    with pytest.raises(LLMInputError, match="text alone"):
        llm.build_inputs(tokens, alloc, TIMES[:3], CONTEXT)


def test_training_labels_cover_the_assistant_turn_only(llm):
    alloc = np.array([2, 1])
    x = llm.build_inputs(_tokens(alloc), alloc, TIMES[:2], CONTEXT, answer="B")
    prompt = llm.build_inputs(_tokens(alloc), alloc, TIMES[:2], CONTEXT)
    header = _ids(llm, "<|im_start|>assistant\n")
    answer = _ids(llm, "B<|im_end|>\n")
    assert x.input_ids.tolist() == prompt.input_ids.tolist() + answer
    assert x.prompt_length == prompt.length and x.length == prompt.length + len(answer)
    labelled = x.labels != IGNORE_INDEX
    assert labelled.nonzero().flatten().tolist() == list(range(prompt.length - len(header), x.length))
    assert x.labels[labelled].tolist() == header + answer
    assert not (labelled & x.visual_mask).any()
    # The same function serves training: gradients reach the projector.
    llm.zero_grad()
    with torch.enable_grad():
        y = llm.build_inputs(_tokens(alloc), alloc, TIMES[:2], CONTEXT, answer="B")
        out = llm.lm(inputs_embeds=y.inputs_embeds[None], attention_mask=y.attention_mask[None], labels=y.labels[None])
        out.loss.backward()
    assert llm.projector.weight.grad is not None and llm.projector.weight.grad.abs().sum() > 0
    llm.zero_grad()


def test_inputs_embeds_is_build_inputs(llm):
    alloc = np.array([1, 2])
    tokens = _tokens(alloc)
    assert torch.equal(llm.inputs_embeds(tokens, alloc, TIMES[:2], CONTEXT), llm.build_inputs(tokens, alloc, TIMES[:2], CONTEXT).inputs_embeds)
    # torch input works the same as numpy.
    assert torch.equal(llm.inputs_embeds(torch.from_numpy(tokens), alloc, TIMES[:2], CONTEXT), llm.inputs_embeds(tokens, alloc, TIMES[:2], CONTEXT))


@pytest.mark.parametrize(
    ("tokens", "alloc", "times", "match"),
    [
        (np.zeros((3, 64), np.float16), np.array([1, 1]), TIMES[:2], "sum"),
        (np.zeros((2, 32), np.float16), np.array([1, 1]), TIMES[:2], "64"),
        (np.zeros((2, 64), np.float16), np.array([1, 1]), TIMES[:1], "timestamp"),
        (np.zeros((0, 64), np.float16), np.array([-1, 1]), TIMES[:2], "non-negative"),
        (np.zeros((2, 64), np.float16), np.array([1.0, 1.0]), TIMES[:2], "integers"),
    ],
)
def test_bad_inputs_are_typed_errors(llm, tokens, alloc, times, match):
    with pytest.raises(LLMInputError, match=match):
        llm.build_inputs(tokens, alloc, times, CONTEXT)
