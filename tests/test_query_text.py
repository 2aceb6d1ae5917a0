"""Benchmark prompt templates render character for character (docs/METHOD.md, "Query text")."""

import pytest

from tempo_ops.errors import ConfigError
from tempo_ops.query_text import TEMPLATES, get_template, option_letters, render_query, strip_option_label

Q = "What is added first?"


def test_plain_is_the_question_then_options_verbatim():
    assert render_query(Q) == Q
    assert render_query(Q, ["A. salt", "B. oil"]) == "What is added first?\nA. salt\nB. oil"


def test_videomme_exact():
    got = render_query(Q, ["A. salt", "B. oil", "C. sugar", "D. water"], "videomme")
    assert got == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "What is added first?\nA. salt\nB. oil\nC. sugar\nD. water\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    # bare options get the same labels
    assert got == render_query(Q, ["salt", "oil", "sugar", "water"], "videomme")


def test_lvbench_exact():
    assert render_query(Q, ["salt", "oil"], "lvbench") == "What is added first?\n(A) salt\n(B) oil\nAnswer the question with the option letter"
    assert render_query(Q, None, "lvbench") == "What is added first?\nAnswer the question with the option letter"
    assert render_query(Q, ["(A) salt", "B) oil"], "lvbench") == render_query(Q, ["salt", "oil"], "lvbench")


def test_mlvu_exact():
    assert render_query("Q?\n(A) x\n(B) y", None, "mlvu") == "Q?\n(A) x\n(B) y\nOnly give the best option.\nBest option: ("
    assert render_query("Q?", ["x", "y"], "mlvu") == "Q?\n(A) x\n(B) y\nOnly give the best option.\nBest option: ("


def test_longvideobench_exact_and_skips_na():
    got = render_query(Q, ["salt", "N/A", "oil"], "longvideobench")
    assert got == "What is added first?\nA. salt\nB. oil\nAnswer with the option's letter from the given choices directly.\n"
    assert option_letters(["salt", "N/A", "oil"], "longvideobench") == "AB"
    assert option_letters(["salt", "N/A", "oil"], "plain") == "ABC"


def test_image_tag_removed():
    assert render_query("<image>What?", None, "plain") == "What?"


def test_strip_option_label_only_own_letter():
    assert strip_option_label("A. salt", "A") == "salt"
    assert strip_option_label("(B) oil", "B") == "oil"
    assert strip_option_label("C: x", "C") == "x"
    assert strip_option_label("B. oil", "A") == "B. oil"
    assert strip_option_label("Apple", "A") == "Apple"


def test_unknown_template_and_too_many_options():
    with pytest.raises(ConfigError, match="unknown prompt template"):
        render_query(Q, None, "nope")
    with pytest.raises(ConfigError):
        render_query(Q, [str(i) for i in range(27)], "videomme")
    assert get_template(None).name == "plain"
    assert {t.max_new_tokens for n, t in TEMPLATES.items() if n in ("videomme", "lvbench", "mlvu")} == {16}
    assert TEMPLATES["longvideobench"].max_new_tokens == 32
