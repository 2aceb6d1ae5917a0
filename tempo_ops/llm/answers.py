"""Parsing and scoring the LLM stage's answers, deterministically (docs/METHOD.md "LLM stage").

Three rules, chosen by the prompt template (``tempo_ops.query_text.PromptTemplate.answer_rule``)
and by whether the query has options:

- ``"mc"`` — lmms-eval's multiple-choice extraction. Candidates are collected per option
  letter and format; the best format wins, by priority

      start > end > answer phrase ("the answer is X", "answer: X", "I choose X", ...)
      > "(X)" > "X." > "X:" > "X)" > "X " > fallback (the letter anywhere)

  and within the best format the candidate that occurs last in the text. The response is
  stripped of surrounding ``, . ! ? ; : ' "`` first. Only the query's option letters count,
  and only as stand-alone letters (not inside a word: "CANNOT" holds no "C"). Where the
  reference would then guess at random, we return None ("no answer").
- ``"first_letter"`` — LongVideoBench: remove the answer prefixes ("The best answer is",
  "Answer:", ...), then take the first ``[ABCDE]`` of the text, as the reference does
  (letters inside words count there, lower case does not).
  Where the reference guesses at random: None.
- ``"open"`` — queries without options: the stripped answer text; correct when it equals the
  reference answer after ``normalize_text`` (lower case, punctuation and the articles
  a/an/the removed, whitespace collapsed).

``None`` ("no answer") is always scored wrong; jobs count and report it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from tempo_ops.query_text import get_template, option_letters, strip_option_label

ANSWER_PHRASES: tuple[str, ...] = (
    "the correct answer is",
    "correct answer is",
    "the best answer is",
    "best answer is",
    "the answer is",
    "answer is",
    "the correct option is",
    "correct option is",
    "the option is",
    "option is",
    "the correct choice is",
    "correct choice is",
    "the choice is",
    "choice is",
    "my answer is",
    "my choice is",
    "best option:",
    "best option",
    "answer:",
    "option:",
    "i choose",
    "i select",
    "i pick",
)
"""Phrases after which the first stand-alone option letter is an answer candidate (lower case)."""

FORMAT_PRIORITY: dict[str, int] = {
    "start": 8,
    "end": 7,
    "phrase": 6,
    "parentheses": 5,
    "period": 4,
    "colon": 3,
    "right_paren": 2,
    "space": 1,
    "fallback": 0,
}
_STRIP = ",.!?;:'\""
LONGVIDEOBENCH_PREFIXES: tuple[str, ...] = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
)


@dataclass(frozen=True)
class Scored:
    """A parsed and scored answer: ``parsed`` (a letter, the normalised text, or None = no answer),
    ``correct`` (bool), ``rule`` ("mc", "first_letter" or "open")."""

    parsed: str | None
    correct: bool
    rule: str


def _standalone(text: str, pos: int, length: int = 1) -> bool:
    """True when ``text[pos:pos+length]`` is not glued to letters on either side."""
    before = text[pos - 1] if pos > 0 else " "
    after = text[pos + length] if pos + length < len(text) else " "
    return not before.isalpha() and not after.isalpha()


def _last(text: str, needle: str, letter_at: int) -> int:
    """Last position of ``needle`` in ``text`` whose letter (at offset ``letter_at``) stands alone; -1 if none."""
    pos = text.rfind(needle)
    while pos != -1:
        if _standalone(text, pos + letter_at):
            return pos
        pos = text.rfind(needle, 0, pos)
    return -1


def parse_multiple_choice(response: str, letters: str) -> str | None:
    """The option letter lmms-eval's extraction picks from ``response`` (see the module docstring), or None."""
    if not letters:
        return None
    core = str(response).strip().strip(_STRIP).strip()
    text = " " + core.upper() + " "
    lower = text.lower()
    candidates: list[tuple[int, int, str]] = []  # (priority, position, letter)

    def add(fmt: str, pos: int, letter: str) -> None:
        if pos >= 0:
            candidates.append((FORMAT_PRIORITY[fmt], pos, letter))

    body = core.upper()
    for ch in letters:
        if body.startswith(ch) and _standalone(body, 0):
            add("start", 0, ch)
        if body.endswith(ch) and _standalone(body, len(body) - 1):
            add("end", len(text) - 2, ch)
        add("parentheses", _last(text, f"({ch})", 1), ch)
        add("period", _last(text, f"{ch}.", 0), ch)
        add("colon", _last(text, f"{ch}:", 0), ch)
        add("right_paren", _last(text, f"{ch})", 0), ch)
        add("space", _last(text, f"{ch} ", 0), ch)
    for phrase in ANSWER_PHRASES:
        start = lower.find(phrase)
        while start != -1:
            after = start + len(phrase)
            for pos in range(after, len(text)):
                if text[pos] in letters and _standalone(text, pos):
                    add("phrase", pos, text[pos])
                    break
            start = lower.find(phrase, start + 1)
    if not candidates:
        for ch in letters:
            add("fallback", _last(text, ch, 0), ch)
    if not candidates:
        return None
    best = max(p for p, _, _ in candidates)
    return max((pos, letter) for p, pos, letter in candidates if p == best)[1]


def parse_first_letter(response: str, letters: str = "ABCDE") -> str | None:
    """LongVideoBench's extraction: the first of ``letters`` after removing answer prefixes, or None."""
    s = str(response).strip()
    for prefix in LONGVIDEOBENCH_PREFIXES:
        s = s.replace(prefix, "")
    found = re.search(f"[{re.escape(letters)}]", s) if letters else None
    return found.group(0) if found else None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (for open-ended exact match)."""
    t = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", t).split())


def gold_letter(answer: str, options: Sequence[str] | None, template: str | None) -> str | None:
    """The option letter a reference answer names: a bare letter (``"B"``, ``"(B)"``, ``"B."``), a
    labelled option (``"B. oil"``) or an option's text (``"oil"``); None when it names none."""
    letters = option_letters(options, template)
    a = str(answer).strip()
    m = re.fullmatch(r"\(?([A-Z])[.):]?", a)
    if m and m.group(1) in letters:
        return m.group(1)
    kept = [o for o in (options or []) if not (get_template(template).name == "longvideobench" and o == "N/A")]
    for letter, option in zip(letters, kept):
        text = strip_option_label(option, letter).strip()
        if normalize_text(a) in (normalize_text(option), normalize_text(text)):
            return letter
        if re.match(rf"\(?{letter}[.):]\s", a):
            return letter
    return None


def answer_rule(options: Sequence[str] | None, template: str | None) -> str:
    """The rule that scores a query: ``"open"`` without options, else the template's rule."""
    return "open" if not options else get_template(template).answer_rule


def score_answer(response: str, answer: str, options: Sequence[str] | None, template: str | None) -> Scored:
    """Parse ``response`` with the query's rule and compare it with the reference ``answer``."""
    rule = answer_rule(options, template)
    if rule == "open":
        parsed = normalize_text(response)
        return Scored(parsed or None, bool(parsed) and parsed == normalize_text(answer), rule)
    letters = option_letters(options, template)
    parsed = parse_first_letter(response, "ABCDE") if rule == "first_letter" else parse_multiple_choice(response, letters)
    gold = gold_letter(answer, options, template)
    return Scored(parsed, parsed is not None and parsed == gold, rule)
