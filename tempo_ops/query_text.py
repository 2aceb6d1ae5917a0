"""Benchmark prompt templates: the one place a manifest query becomes the text models read.

The reference gives the compressor the *same full prompt string the LLM answers*: the
benchmark's instruction, the question, the lettered options and the closing line (any
``<image>`` removed). :func:`render_query` builds that string; the SVLM reads it after
``"\\nQuery:\\n"`` and the LLM stage reads it as the ``{context}`` of its prompt, so the
compression job, evaluation, training and ``tempo ask`` must all call this function
(docs/METHOD.md, "Query text").

Templates (``TEMPLATES``), character for character as lmms-eval's default prompts:

- ``plain`` (default): the question alone; options, if given, follow one per line
  exactly as written in the manifest (nothing is dropped silently).
- ``videomme``: ``"Select the best answer ... correct option.\\n{question}\\n{A. opt}\\n...
  \\n\\nAnswer with the option's letter from the given choices directly."``
- ``lvbench``: ``"{question}\\n(A) opt\\n(B) opt...\\nAnswer the question with the option letter"``
- ``mlvu``: ``"{question}\\nOnly give the best option.\\nBest option: ("`` (the MLVU dataset
  keeps its options inside the question; options given separately in the manifest are
  appended to the question as ``"\\n(A) opt"`` lines first).
- ``longvideobench``: ``"{question}\\nA. opt\\nB. opt...\\nAnswer with the option's letter from
  the given choices directly.\\n"`` (options equal to ``"N/A"`` are skipped and the letters
  follow the remaining options).

Options may be written bare (``"salt"``) or already labelled with their own letter
(``"A. salt"``, ``"(A) salt"``, ``"A) salt"``, ``"A: salt"``); a template that labels options
strips such a label first, so one manifest renders correctly under every template.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from tempo_ops.errors import ConfigError

DEFAULT_TEMPLATE = "plain"
LETTERS = string.ascii_uppercase

_VIDEOMME_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video and the "
    "subtitles. Respond with only the letter (A, B, C, or D) of the correct option."
)
_VIDEOMME_CLOSING = "Answer with the option's letter from the given choices directly."
_LVBENCH_CLOSING = "Answer the question with the option letter"
_MLVU_CLOSING = "Only give the best option.\nBest option: ("
_LONGVIDEOBENCH_CLOSING = "Answer with the option's letter from the given choices directly.\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A benchmark's prompt rules.

    name: the template's name (part of a cache entry's identity).
    max_new_tokens: the LLM stage's generation limit for answers under this template.
    answer_rule: how the LLM's answer is parsed: ``"mc"`` (lmms-eval multiple-choice
        extraction), ``"first_letter"`` (LongVideoBench: the first A-E after answer prefixes)
        or ``"open"`` (free text, exact match after normalisation; used by ``plain`` when a
        query has no options).
    """

    name: str
    max_new_tokens: int
    answer_rule: str


TEMPLATES: dict[str, PromptTemplate] = {
    "plain": PromptTemplate("plain", max_new_tokens=32, answer_rule="mc"),
    "videomme": PromptTemplate("videomme", max_new_tokens=16, answer_rule="mc"),
    "lvbench": PromptTemplate("lvbench", max_new_tokens=16, answer_rule="mc"),
    "mlvu": PromptTemplate("mlvu", max_new_tokens=16, answer_rule="mc"),
    "longvideobench": PromptTemplate("longvideobench", max_new_tokens=32, answer_rule="first_letter"),
}


def get_template(name: str | None) -> PromptTemplate:
    """The template called ``name`` (None → ``DEFAULT_TEMPLATE``).

    Raises:
        ConfigError: an unknown template name (the message lists the known ones).
    """
    key = DEFAULT_TEMPLATE if name is None else name
    try:
        return TEMPLATES[key]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}", item="prompt_template") from None


def strip_option_label(option: str, letter: str) -> str:
    """``option`` without a leading label of its own ``letter`` (``"A. x"``, ``"(A) x"``, ``"A) x"``, ``"A: x"`` → ``"x"``)."""
    m = re.match(rf"\s*(?:\({letter}\)|{letter}[.):])\s*", option)
    return option[m.end():] if m else option


def _lettered(options: Sequence[str], fmt: str) -> list[str]:
    if len(options) > len(LETTERS):
        raise ConfigError(f"{len(options)} options; at most {len(LETTERS)} can be lettered", item="options")
    return [fmt.format(letter=LETTERS[i], text=strip_option_label(o, LETTERS[i])) for i, o in enumerate(options)]


def render_query(question: str, options: Sequence[str] | None = None, template: str | None = None) -> str:
    """The full prompt string for one query under ``template`` (see the module docstring).

    question: the manifest query's ``text``; options: its ``options`` (or None);
    template: a name in ``TEMPLATES`` (None → ``plain``). ``<image>`` is removed from the result.

    Raises:
        ConfigError: unknown template, or more options than letters.
    """
    name = get_template(template).name
    opts = list(options or [])
    if name == "plain":
        text = "\n".join([question, *opts])
    elif name == "videomme":
        text = "\n".join([_VIDEOMME_INSTRUCTION, question, *_lettered(opts, "{letter}. {text}")]) + "\n\n" + _VIDEOMME_CLOSING
    elif name == "lvbench":
        text = "\n".join([question, *_lettered(opts, "({letter}) {text}"), _LVBENCH_CLOSING])
    elif name == "mlvu":
        text = "\n".join([question, *_lettered(opts, "({letter}) {text}"), _MLVU_CLOSING])
    else:  # longvideobench
        kept = [o for o in opts if o != "N/A"]
        text = "\n".join([question, *_lettered(kept, "{letter}. {text}"), _LONGVIDEOBENCH_CLOSING])
    return text.replace("<image>", "")


def option_letters(options: Sequence[str] | None, template: str | None = None) -> str:
    """The letters a correct answer may take for these options under ``template`` (e.g. ``"ABCD"``)."""
    opts = [o for o in (options or []) if not (get_template(template).name == "longvideobench" and o == "N/A")]
    return LETTERS[: len(opts)]
