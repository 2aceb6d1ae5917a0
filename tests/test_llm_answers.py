"""Answer parsing tables: lmms-eval multiple choice, LongVideoBench first letter, open-ended exact match."""

from __future__ import annotations

import pytest

from tempo_ops.llm.answers import (
    gold_letter,
    normalize_text,
    parse_first_letter,
    parse_multiple_choice,
    score_answer,
)

MC_CASES = [
    # format priority: start
    ("A", "A"),
    ("B.", "B"),
    ("C) the red car", "C"),
    ("D: a dog", "D"),
    ("A. salt, not B", "A"),  # start beats a later "B" at the end
    ("(B) oil", "B"),
    # end
    ("The option I pick is C", "C"),  # end (priority) over phrase
    ("I think it is D", "D"),
    ("Probably B.", "B"),  # trailing period stripped → end
    ("Between A and C it has to be C", "C"),
    # answer phrases
    ("The answer is B because it fits.", "B"),
    ("Answer: C, since the man leaves.", "C"),
    ("I choose D and not A here", "D"),
    ("the correct answer is A for sure", "A"),
    ("My answer is C as shown earlier", "C"),
    # (X)
    ("It shows (B) clearly and so on", "B"),
    ("Either (A) or (C) here maybe so", "C"),  # last occurrence of the best format
    # X.  X:  X)
    ("Option C. is what I see here", "C"),
    ("It is B: the oil bottle then", "B"),
    ("It is D) the blue one then", "D"),
    # X
    ("so A is likely here then", "A"),
    # fallback
    ("between A/B-ish ones", "B"),  # no format holds: the last stand-alone letter
    ("A/B", "A"),  # start outranks everything
    # nothing stand-alone: no answer (the reference would guess)
    ("CANNOT DECIDE", None),
    ("", None),
    ("I do not know", None),
    ("The video is unclear.", None),
    # letters outside the option set are ignored
    ("E", None),
    ("E. none, so B", "B"),
    # matching is case-insensitive, as lmms-eval's (it upper-cases the response)
    ("a dog runs", "A"),
    ("the answer is c", "C"),
]


@pytest.mark.parametrize(("response", "expected"), MC_CASES)
def test_multiple_choice_table(response, expected):
    assert parse_multiple_choice(response, "ABCD") == expected


def test_multiple_choice_is_deterministic_and_needs_letters():
    assert all(parse_multiple_choice("I really cannot tell", "ABCD") is None for _ in range(5))
    assert parse_multiple_choice("A", "") is None
    assert parse_multiple_choice("F", "ABCDEF") == "F"


FIRST_LETTER_CASES = [
    ("A", "A"),
    ("B.", "B"),
    ("The best answer is C", "C"),
    ("The correct answer is D.", "D"),
    ("The answer is E", "E"),
    ("The answer B", "B"),
    ("The best option is A", "A"),
    ("The correct option is (C)", "C"),
    ("Best answer: D", "D"),
    ("Best option: B", "B"),
    ("Answer: A", "A"),
    ("Option: E", "E"),
    ("(D) the dog", "D"),
    ("C and then A", "C"),  # the first letter, not the last
    ("The Dog runs, B", "D"),  # letters inside words count, as in the reference
    ("the answer is b", None),  # lower case never counts
    ("", None),
    ("no letter here at all", None),
    ("F G H", None),
    ("Answer: F then C", "C"),
    ("  B  ", "B"),
    ("Answer:Answer: A", "A"),
]


@pytest.mark.parametrize(("response", "expected"), FIRST_LETTER_CASES)
def test_first_letter_table(response, expected):
    assert parse_first_letter(response) == expected


OPEN_CASES = [
    ("red", "red", True),
    ("Red.", "red", True),
    ("The red one", "red one", True),
    ("  a RED car ", "red car", True),
    ("red car!", "Red car", True),
    ("an apple", "apple", True),
    ("Two", "two", True),
    ("two", "2", False),
    ("blue", "red", False),
    ("red and blue", "red", False),
    ("", "red", False),
    ("...", "red", False),
    ("the the", "", False),
    ("New  York", "new york", True),
    ("new-york", "newyork", True),
    ("It's red", "its red", True),
    ("red\ncar", "red car", True),
    ("Theater", "theater", True),  # "the" inside a word stays
    ("a", "A", False),  # an article alone normalises to nothing: no answer
    ("12:30", "1230", True),
    ("yes", "Yes.", True),
    ("no", "yes", False),
]


@pytest.mark.parametrize(("response", "answer", "correct"), OPEN_CASES)
def test_open_table(response, answer, correct):
    scored = score_answer(response, answer, None, "plain")
    assert scored.rule == "open" and scored.correct is correct
    assert scored.parsed == (normalize_text(response) or None)


def test_gold_letters_and_scoring():
    opts = ["salt", "oil", "sugar"]
    assert gold_letter("B", opts, "videomme") == "B"
    assert gold_letter("(C)", opts, "lvbench") == "C"
    assert gold_letter("oil", opts, "videomme") == "B"
    assert gold_letter("B. oil", opts, "videomme") == "B"
    assert gold_letter("D", opts, "videomme") is None
    assert gold_letter("A. salt", ["A. salt", "B. oil"], "plain") == "A"
    assert gold_letter("B", ["x", "N/A", "y"], "longvideobench") == "B"  # N/A skipped: B is "y"
    s = score_answer("The answer is B", "B", opts, "videomme")
    assert (s.parsed, s.correct, s.rule) == ("B", True, "mc")
    s = score_answer("I cannot tell", "B", opts, "videomme")
    assert (s.parsed, s.correct) == (None, False)
    s = score_answer("Answer: C", "A", opts, "longvideobench")
    assert (s.parsed, s.correct, s.rule) == ("C", False, "first_letter")
