"""A small Qwen-style byte-level BPE tokenizer, trained offline, for tiny test/demo models.

It uses Qwen2's pre-tokenizer (the same split regex + byte-level mapping, NFC normaliser),
is trained with the ``tokenizers`` library on a small built-in English corpus (the Tempo
prompts, digits, "seconds", "Yes", "No", ...) and carries the Qwen special tokens
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|video_pad|>``, ...)
after the learned vocabulary, in Qwen's order. "Yes" and "No" each encode to one token.
The result loads with ``AutoTokenizer.from_pretrained(dir)`` as a fast ``Qwen2Tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tempo_ops.errors import TokenizerError
from tempo_ops.svlm.prompt import DEFAULT_QUERY, SYSTEM_PROMPT, SYSTEM_PROMPT_TRAINING

# Qwen2's pre-tokenisation regex (contractions, letters, single digits, punctuation, spaces).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (content, special) in Qwen2/Qwen3-VL order; they follow the learned vocabulary.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# The Qwen3-VL-Instruct chat template (jinja), as shipped with the released models.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_CORPUS_LINES = (
    SYSTEM_PROMPT,
    SYSTEM_PROMPT_TRAINING,
    DEFAULT_QUERY,
    "Query:",
    "Yes",
    "No",
    "Yes.",
    "No.",
    "Answer: Yes",
    "Answer: No",
    "Is this segment relevant to the Query? Yes",
    "Is this segment relevant to the Query? No",
    "You are a helpful assistant.",
    "What is the person in the video doing?",
    "What color is the car that drives past the camera?",
    "How many people are in the room at the start of the video?",
    "Where does the man put the red box after he opens the door?",
    "When does the dog jump over the fence?",
    "Which animal appears first, the cat or the bird?",
    "Why does the woman leave the kitchen?",
    "Summarize the video in one sentence.",
    "The video shows a person walking along a street with trees and parked cars.",
    "A child plays with a ball in the garden while the sun sets.",
    "The camera pans across a city at night, with lights and moving traffic.",
    "Describe the scene, the objects, the people and what they do.",
    "Select the best answer to the following multiple-choice question based on the video.",
    "Options: A. red B. blue C. green D. yellow",
    "Answer with the option's letter from the given choices directly.",
    "The answer is A. The answer is B. The answer is C. The answer is D.",
    "seconds second minute minutes hour hours frame frames segment segments time timestamp",
    "<0.5 seconds> <1.0 seconds> <2.5 seconds> <10.0 seconds> <123.4 seconds>",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256 512 1024 2048",
    "system user assistant tool",
    "The quick brown fox jumps over the lazy dog.",
    "first second third last before after during while then next finally",
    "left right top bottom front back inside outside near far above below",
)


def training_corpus(repeats: int = 8) -> list[str]:
    """The built-in English corpus (lines), each repeated so that frequent words merge fully."""
    return [line for _ in range(repeats) for line in _CORPUS_LINES]


QWEN_FIRST_ADDED_ID = 151643
"""Id of ``<|endoftext|>`` (the first added token) in the released Qwen2/Qwen3 tokenizers."""


def build_tokenizer(vocab_size: int = 1024, *, added_tokens_at: int | None = None) -> Tokenizer:
    """Train the byte-level BPE and append the Qwen special tokens.

    Args:
        vocab_size: target size of the learned vocabulary (bytes + merges) before the added tokens.
        added_tokens_at: when given (e.g. ``QWEN_FIRST_ADDED_ID``), the learned vocabulary is
            padded with unreachable filler entries so that the added tokens get exactly the ids
            the released Qwen tokenizers give them (``<|endoftext|>`` = 151643, ``<|video_pad|>`` =
            151656, ...), as the released model configs expect.
    Returns:
        A ``tokenizers.Tokenizer``; raises ``TokenizerError`` if "Yes"/"No" are not single tokens.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    if added_tokens_at is not None:
        tok = _pad_vocab(tok, added_tokens_at)
    for content, special in QWEN_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    for word in ("Yes", "No"):
        ids = tok.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            raise TokenizerError(f"{word!r} encodes to {len(ids)} tokens, need exactly 1", item="tiny tokenizer")
    return tok


def _pad_vocab(tok: Tokenizer, size: int) -> Tokenizer:
    """``tok`` with filler vocabulary entries up to ``size`` ids. A filler holds a character outside
    the byte-level alphabet, so no merge ever produces it: encoding is unchanged."""
    doc = json.loads(tok.to_str())
    vocab: dict[str, int] = doc["model"]["vocab"]
    if size < len(vocab):
        raise TokenizerError(f"cannot place added tokens at {size}: {len(vocab)} tokens are learned", item="tiny tokenizer")
    for i in range(len(vocab), size):
        vocab[f"\u2400{i}"] = i
    return Tokenizer.from_str(json.dumps(doc))


def tokenizer_files(tok: Tokenizer, *, model_max_length: int = 262144) -> dict[str, Any]:
    """The files that make ``tok`` loadable by ``AutoTokenizer``: name → JSON-able content or text."""
    added_decoder = {}
    for content, special in QWEN_ADDED_TOKENS:
        added_decoder[str(tok.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [c for c, s in QWEN_ADDED_TOKENS if s and c not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    vocab = tok.get_vocab(with_added_tokens=False)
    vocab_sorted = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    tok_json = json.loads(tok.to_str())
    merges = tok_json["model"]["merges"]
    merges_txt = "#version: 0.2\n" + "".join(
        (" ".join(m) if isinstance(m, list) else m) + "\n" for m in merges
    )
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": tokenizer_config,
        "vocab.json": vocab_sorted,
        "merges.txt": merges_txt,
        "chat_template.jinja": QWEN3_VL_CHAT_TEMPLATE,
    }


def write_tokenizer(out_dir: str | Path, tok: Tokenizer | None = None) -> Path:
    """Write the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
    ``merges.txt``, ``chat_template.jinja``) into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tok if tok is not None else build_tokenizer()
    for name, content in tokenizer_files(tok).items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (out / name).write_text(text, encoding="utf-8")
    return out
