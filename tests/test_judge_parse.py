"""Judge prompt, parser and guided grammar (METHOD §7) on a hand-written corpus of judge outputs."""

from __future__ import annotations

import re

import pytest

from actprm_ray.data.step_format import StepFormatError
from actprm_ray.label.base import NO_LABEL
from actprm_ray.label.parse import parse_judge_output
from actprm_ray.label.prompt import PROMPT_VERSION, build_judge_prompt, guided_regex

A = "<analysis_{0}>{1}</analysis_{0}>\n"


def analyses(*notes: str) -> str:
    return "".join(A.format(j, note) for j, note in enumerate(notes, start=1))


# (name, text, num_steps, expected first_error_step or None for INVALID, expected mismatch, words in the reason)
CORPUS = [
    ("all correct", analyses("fine", "fine", "fine") + "<conclusion>Correct</conclusion>", 3, -1, False, ""),
    ("error at 2, named 2", analyses("fine", "7*3 is 21, not 24") + "<conclusion>Incorrect: paragraph 2</conclusion>",
     3, 1, False, ""),
    ("error at first paragraph", analyses("wrong unit") + "<conclusion>Incorrect: paragraph 1</conclusion>", 4, 0,
     False, ""),
    ("error at last paragraph", analyses("ok", "ok", "bad") + "<conclusion>Incorrect: paragraph 3</conclusion>", 3, 2,
     False, ""),
    ("verdict in capitals with spaces", analyses("ok") + "<conclusion>\n  CORRECT \n</conclusion>", 1, -1, False, ""),
    ("decorated verdict", analyses("ok", "ok") + "<conclusion>**Correct.**</conclusion>", 2, -1, False, ""),
    ("upper-case tags", "<ANALYSIS_1>ok</ANALYSIS_1><ANALYSIS_2>bad</ANALYSIS_2>"
     "<CONCLUSION>Incorrect: paragraph 2</CONCLUSION>", 2, 1, False, ""),
    ("correct although it stopped early", analyses("ok") + "<conclusion>Correct</conclusion>", 3, -1, False, ""),
    ("'not correct' is not a correct verdict", analyses("ok", "bad") + "<conclusion>Not correct: paragraph 2"
     "</conclusion>", 3, 1, False, ""),
    ("verdict without an index", analyses("ok", "bad") + "<conclusion>Incorrect</conclusion>", 3, 1, False, ""),
    ("index as a bare number", analyses("ok", "bad") + "<conclusion>Incorrect (2)</conclusion>", 3, 1, False, ""),
    ("first conclusion wins", analyses("bad") + "<conclusion>Incorrect: paragraph 1</conclusion>"
     "<conclusion>Correct</conclusion>", 2, 0, False, ""),
    ("analysis after the verdict is ignored", analyses("bad") + "<conclusion>Incorrect: paragraph 1</conclusion>"
     "<analysis_2>more</analysis_2>", 2, 0, False, ""),
    ("prose around the tags", "Here is my review.\n" + analyses("ok", "bad") + "So:\n<conclusion>Incorrect: "
     "paragraph 2</conclusion>\nThanks!", 2, 1, False, ""),
    # mismatch: the verdict names another paragraph than the last analysis; k follows the analysis (rule 4).
    ("mismatch: names 3, last analysis 2", analyses("ok", "bad") + "<conclusion>Incorrect: paragraph 3</conclusion>",
     3, 1, True, ""),
    ("mismatch: names 1, last analysis 3", analyses("ok", "ok", "bad") + "<conclusion>Incorrect: paragraph 1"
     "</conclusion>", 3, 2, True, ""),
    # reasoning section
    ("tags inside the thinking are ignored",
     "<think>Draft: <analysis_1>bad</analysis_1><conclusion>Incorrect: paragraph 1</conclusion> no wait.</think>"
     + analyses("ok", "ok", "bad") + "<conclusion>Incorrect: paragraph 3</conclusion>", 3, 2, False, ""),
    ("QwQ style: no opening think tag",
     "Let me check. <conclusion>Correct</conclusion> hmm, paragraph 1 is wrong.\n</think>\n\n"
     + analyses("bad") + "<conclusion>Incorrect: paragraph 1</conclusion>", 2, 0, False, ""),
    ("thinking quotes the end marker: the last one counts",
     "<think>I must close with </think> later. <conclusion>Correct</conclusion></think>"
     + analyses("ok", "bad") + "<conclusion>Incorrect: paragraph 2</conclusion>", 2, 1, False, ""),
    # INVALID
    ("empty string", "", 3, None, False, "empty"),
    ("whitespace only", "  \n\t ", 3, None, False, "empty"),
    ("garbage", "the apples cost 5 dollars each so 3 boxes", 3, None, False, "conclusion"),
    ("think only, cut off", "<think>Paragraph 1 looks fine. <analysis_1>ok</analysis_1><conclusion>Correct"
     "</conclusion>", 2, None, False, "thinking"),
    ("nothing after the thinking", "<think>all fine</think>\n\n", 2, None, False, "after the thinking"),
    ("conclusion never closed", analyses("ok") + "<conclusion>Correct", 1, None, False, "conclusion"),
    ("no analysis tag and not correct", "<conclusion>Incorrect: paragraph 2</conclusion>", 3, None, False, "analysis"),
    ("analysis index above the step count", analyses("ok", "ok", "ok", "bad") + "<conclusion>Incorrect: "
     "paragraph 4</conclusion>", 3, None, False, "outside 1..3"),
    ("analysis index zero", "<analysis_0>bad</analysis_0><conclusion>Incorrect: paragraph 0</conclusion>", 3, None,
     False, "outside 1..3"),
    ("a verdict that only mentions correct", analyses("ok") + "<conclusion>Correctly done</conclusion>", 1, 0, False,
     ""),
]


@pytest.mark.parametrize("name,text,m,k,mismatch,reason_words", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(name, text, m, k, mismatch, reason_words):
    r = parse_judge_output(text, m)
    if k is None:
        assert not r.ok
        assert r.first_error_step == NO_LABEL and r.hard_labels == []
        assert reason_words in r.reason
    else:
        assert r.ok, r.reason
        assert r.reason == ""
        assert r.first_error_step == k
        expected_labels = [1] * m if k == -1 else [1] * k + [0]
        assert r.hard_labels == expected_labels
    assert r.mismatch is mismatch


def test_strict_mode_rejects_a_mismatch_and_keeps_the_flag():
    text = analyses("ok", "bad") + "<conclusion>Incorrect: paragraph 3</conclusion>"
    r = parse_judge_output(text, 3, strict=True)
    assert not r.ok and r.mismatch and r.first_error_step == NO_LABEL
    assert "paragraph 3" in r.reason and "paragraph 2" in r.reason


def test_strict_mode_accepts_a_consistent_critique():
    text = analyses("ok", "bad") + "<conclusion>Incorrect: paragraph 2</conclusion>"
    r = parse_judge_output(text, 3, strict=True)
    assert r.ok and r.first_error_step == 1 and not r.mismatch


def test_num_steps_below_one_is_a_caller_bug():
    with pytest.raises(ValueError):
        parse_judge_output("<conclusion>Correct</conclusion>", 0)


# ---- prompt ---------------------------------------------------------------------------------------------------


def test_prompt_numbers_the_canonical_paragraphs_from_one():
    prompt = build_judge_prompt("  What is 2+3?\n\n Be brief. ", ["First,\n\n add 2 and 3.", " So 5.<extra_0> "])
    assert "<problem>\nWhat is 2+3? Be brief.\n</problem>" in prompt
    assert "<paragraph_1>\nFirst, add 2 and 3.\n</paragraph_1>" in prompt
    assert "<paragraph_2>\nSo 5.\n</paragraph_2>" in prompt  # separator string removed, like the PRM input
    assert "<paragraph_3>" not in prompt
    assert "<conclusion>Correct</conclusion>" in prompt and "<conclusion>Incorrect: paragraph j</conclusion>" in prompt
    assert PROMPT_VERSION


# The judge prompt's text and tags per PROMPT_VERSION (sha256 of a fixed rendering, first 16 hex digits). A change
# detector, not a claim about the prompt: edit the prompt, bump config.JUDGE_PROMPT_VERSION, add its line here.
PROMPT_FINGERPRINTS = {"actprm-judge-v1": "3a361cb047803097"}


def test_a_changed_prompt_has_a_new_version():
    """The version is part of the label-cache key: a prompt edited under an old version would reuse critiques
    written for the old text."""
    import hashlib

    from actprm_ray.label.prompt import render_judge_prompt

    text = render_judge_prompt("Q?", ["a.", "b."]) + guided_regex(2)
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == PROMPT_FINGERPRINTS.get(PROMPT_VERSION), (
        f"the judge prompt changed under {PROMPT_VERSION!r}: bump config.JUDGE_PROMPT_VERSION and record it here")


def test_prompt_rejects_unusable_rows():
    with pytest.raises(StepFormatError):
        build_judge_prompt("q", [])
    with pytest.raises(StepFormatError):
        build_judge_prompt("q", ["ok", " \n\n "])


# ---- guided grammar -------------------------------------------------------------------------------------------

GOOD_FOR_3 = [
    analyses("ok", "ok", "ok") + "<conclusion>Correct</conclusion>",
    analyses("x < 3 holds") + "<conclusion>Incorrect: paragraph 1</conclusion>",
    analyses("ok", "bad") + "<conclusion>Incorrect: paragraph 2</conclusion>",
    analyses("", "", "") + "<conclusion>Incorrect: paragraph 3</conclusion>",
]
BAD_FOR_3 = [
    analyses("ok") + "<conclusion>Correct</conclusion>",  # "Correct" before every paragraph was checked
    analyses("ok", "bad") + "<conclusion>Incorrect: paragraph 3</conclusion>",  # mismatch
    analyses("ok", "ok", "ok", "bad") + "<conclusion>Incorrect: paragraph 4</conclusion>",  # out of range
    "<analysis_2>bad</analysis_2>\n<conclusion>Incorrect: paragraph 2</conclusion>",  # skipped paragraph 1
    analyses("a </b> c") + "<conclusion>Incorrect: paragraph 1</conclusion>",  # "</" inside a body
    "<conclusion>Correct</conclusion>",
]


@pytest.mark.parametrize("text", GOOD_FOR_3)
def test_guided_regex_accepts_well_formed_critiques_and_they_parse(text):
    assert re.fullmatch(guided_regex(3), text)
    r = parse_judge_output(text, 3, strict=True)
    assert r.ok and not r.mismatch


@pytest.mark.parametrize("text", BAD_FOR_3)
def test_guided_regex_rejects_malformed_critiques(text):
    assert re.fullmatch(guided_regex(3), text) is None


def test_guided_regex_bounds_each_analysis_body():
    short = analyses("a" * 5) + "<conclusion>Incorrect: paragraph 1</conclusion>"
    long = analyses("a" * 6) + "<conclusion>Incorrect: paragraph 1</conclusion>"
    assert re.fullmatch(guided_regex(2, max_analysis_chars=5), short)
    assert re.fullmatch(guided_regex(2, max_analysis_chars=5), long) is None
