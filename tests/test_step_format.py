"""Canonical step format (METHOD §1-§2): normalisation, separator guards, read-out positions, truncation, bad input.

Exact positions are checked against `CharTokenizer`, a fake with one token per character, so every expected
index below is counted by hand. The real tiny BPE tokenizer is used for the invariants and the chat layout.
"""

from __future__ import annotations

import pytest

from actprm_ray.data.collate import collate_encoded, padding_fraction
from actprm_ray.data.step_format import (
    DEFAULT_SEP,
    DEFAULT_SYSTEM_PROMPT,
    StepFormatError,
    canonicalize,
    encode_trajectory,
    first_error_from_labels,
    labels_from_first_error,
    normalize_step,
    sanitize,
)

SEP = DEFAULT_SEP
SEP_ID = 1000


class CharTokenizer:
    """One token per character (id = ord), the separator string is one token (SEP_ID).

    `alias` is a character that also encodes to SEP_ID: it lets a test break the #SEP == #labels invariant
    without the literal separator string (which canonicalize would remove first).
    Chat template: "[system][user]>" so a prompt of system "S" and question "Q" is 7 tokens.
    """

    def __init__(self, sep: str = SEP, alias: str | None = None):
        self.sep, self.alias = sep, alias

    def get_vocab(self) -> dict[str, int]:
        return {self.sep: SEP_ID}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        if token == self.sep:
            return SEP_ID
        return ord(token) if len(token) == 1 else None  # like HF without an unknown token: None for a missing one

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"[{m['content']}]" for m in messages) + ">"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids: list[int] = []
        for i, piece in enumerate(text.split(self.sep)):
            if i:
                ids.append(SEP_ID)
            ids.extend(SEP_ID if c == self.alias else ord(c) for c in piece)
        return {"input_ids": ids}


def chars(s: str) -> list[int]:
    return [ord(c) for c in s]


def encode(tok, question, steps, **kw):
    kw.setdefault("system_prompt", "S")
    return encode_trajectory(tok, question, steps, sep=SEP, **kw)


# -- normalisation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  add 2 and 3.  ", "add 2 and 3."),  # outer whitespace stripped
        ("First,\n\nadd", "First, add"),  # a blank line becomes one space
        ("a \n \t\n  b", "a b"),  # a whitespace run with two newlines, spaces and tabs around them
        ("a\n\n\n\nb", "a b"),  # several blank lines: still one space
        ("a\r\n\r\nb", "a b"),  # Windows line ends
        ("a\nb", "a\nb"),  # a single newline is not a paragraph break: kept
        ("a  b\tc", "a  b\tc"),  # runs without newlines are untouched
        ("x\n\ny\n\nz", "x y z"),
    ],
)
def test_normalize_step_folds_blank_lines(raw, expected):
    assert normalize_step(raw) == expected
    assert "\n\n" not in normalize_step(raw)


def test_canonicalize_normalises_question_and_steps():
    row = canonicalize("  What is\n\n2+3?  ", [" 2 + 3\n\n= 5 ", "\n\nSo 5."], SEP)
    assert row.question == "What is 2+3?"
    assert row.steps == ["2 + 3 = 5", "So 5."]
    assert row.sep_removed == 0


# -- separator guards -------------------------------------------------------------------------------------------


def test_sanitize_counts_each_removal():
    assert sanitize("a<extra_0>b<extra_0>", SEP) == ("ab", 2)
    assert sanitize("plain", SEP) == ("plain", 0)


def test_sanitize_removes_a_separator_formed_by_a_removal():
    # Removing the inner separator joins "<extra_" and "0>" into a new one; it must go too (2 removals).
    assert sanitize("a<extra_<extra_0>0>b", SEP) == ("ab", 2)


def test_step_containing_separator_is_cleaned_and_counted():
    tok = CharTokenizer()
    enc = encode(tok, "Q", ["a<extra_0>b", "c"])
    # "ab" + SEP + "c" + SEP after the 7-token prompt "[S][Q]>".
    assert enc.input_ids == chars("[S][Q]>") + chars("ab") + [SEP_ID] + chars("c") + [SEP_ID]
    assert enc.readout_positions == [9, 11]
    assert enc.sep_removed == 1


def test_step_that_is_only_a_separator_is_rejected():
    with pytest.raises(StepFormatError, match="step 1 is empty"):
        canonicalize("Q", ["a", " <extra_0> "], SEP)


def test_separator_removal_then_blank_line_normalisation():
    # "x\n<SEP>\ny" has no blank line until the separator is removed; the result must still hold no "\n\n".
    row = canonicalize("Q", ["x\n<extra_0>\ny"], SEP)
    assert row.steps == ["x y"]
    assert row.sep_removed == 1


def test_separator_in_question_is_removed_and_not_read_out():
    tok = CharTokenizer()
    enc = encode(tok, "Q<extra_0>", ["ab", "c"])
    # Prompt "[S][Q]>" (7 tokens) once the question's separator is removed; SEPs at 7+2 and 7+4.
    assert enc.input_ids[:7] == chars("[S][Q]>")
    assert enc.readout_positions == [9, 11]
    assert enc.sep_removed == 1


def test_separator_left_in_prompt_is_skipped():
    # The system prompt is not sanitised, so a SEP survives in the prompt: the second defence (only
    # assistant-span SEPs are read out) must skip it. Prompt "[S<SEP>][Q]>" = 8 tokens, SEP at index 2.
    tok = CharTokenizer()
    enc = encode(tok, "Q", ["ab", "c"], system_prompt="S<extra_0>")
    assert enc.input_ids[2] == SEP_ID
    assert enc.readout_positions == [10, 12]


def test_nested_separator_in_step_is_cleaned_with_real_tokenizer(tiny_prm):
    tok = tiny_prm.tokenizer
    enc = encode_trajectory(tok, "q", ["a<extra_<extra_0>0>", "b"], sep=SEP, system_prompt="S")
    assert len(enc.readout_positions) == 2
    assert enc.sep_removed == 2


def test_invariant_failure_is_loud():
    # "§" also encodes to the SEP id: the assistant span then holds 3 SEPs for 2 steps.
    tok = CharTokenizer(alias="§")
    with pytest.raises(StepFormatError, match="3 separators encoded for 2 steps"):
        encode(tok, "Q", ["a§", "b"], labels=[1, 1])


def test_tokenizer_without_separator_is_rejected():
    with pytest.raises(StepFormatError, match="add_separator_token"):
        encode_trajectory(CharTokenizer(sep="<other>"), "Q", ["a"], sep=SEP, system_prompt="S")


# -- read-out positions and the chat layout ---------------------------------------------------------------------


def test_readout_positions_hand_counted():
    tok = CharTokenizer()
    enc = encode(tok, "Q", ["ab", "cd", "e"], labels=[1, 1, 1])
    # [ S ] [ Q ] > a b SEP c d SEP e SEP
    # 0 1 2 3 4 5 6 7 8  9  10 11 12 13 14
    assert enc.input_ids == chars("[S][Q]>ab") + [SEP_ID] + chars("cd") + [SEP_ID] + chars("e") + [SEP_ID]
    assert enc.readout_positions == [9, 12, 14]
    assert enc.labels == [1, 1, 1]
    assert (enc.num_steps, enc.truncated) == (3, False)


def test_chat_layout_with_real_tokenizer(tiny_prm):
    tok = tiny_prm.tokenizer
    enc = encode_trajectory(tok, "What is 2+3?", ["2+3=5", "So 5."], sep=SEP, system_prompt=DEFAULT_SYSTEM_PROMPT)
    # The tiny template is "<|role|>\ncontent\n" per message, then "<|assistant|>\n" as generation prompt.
    expected = (
        f"<|system|>\n{DEFAULT_SYSTEM_PROMPT}\n<|user|>\nWhat is 2+3?\n<|assistant|>\n2+3=5{SEP}So 5.{SEP}"
    )
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == expected
    assert enc.readout_positions[-1] == len(enc.input_ids) - 1  # a separator after the last step too


@pytest.mark.parametrize(
    "question, steps",
    [
        ("Tom has 3 apples.", ["He buys 2 more.", "3 + 2 = 5.", "The answer is \\boxed{5}."]),
        ("A <extra_0> trap?", ["x <extra_0> y", "z\n\n\nw", "ok"]),
        ("One step", ["done"]),
    ],
)
def test_separators_equal_labels_on_real_tokenizer(tiny_prm, question, steps):
    tok = tiny_prm.tokenizer
    sep_id = tok.convert_tokens_to_ids(SEP)
    labels = [1] * len(steps)
    enc = encode_trajectory(tok, question, steps, sep=SEP, system_prompt="S", labels=labels)
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )
    n_prompt = len(tok(prompt.replace(SEP, ""), add_special_tokens=False)["input_ids"])
    assistant_seps = [i for i, t in enumerate(enc.input_ids) if t == sep_id and i >= n_prompt]
    assert enc.readout_positions == assistant_seps
    assert len(enc.readout_positions) == len(enc.labels) == len(steps)


# -- truncation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_length, positions, labels",
    [
        (15, [9, 12, 14], [1, 1, 0]),  # exactly fits
        (14, [9, 12], [1, 1]),  # the last SEP (index 14) is cut
        (13, [9, 12], [1, 1]),  # cut inside step 2
        (12, [9], [1]),  # SEP at 12 is the 13th token: gone
        (10, [9], [1]),
        (9, [], []),  # no SEP survives: the row contributes nothing
        (3, [], []),  # cut inside the prompt
    ],
)
def test_truncation_keeps_label_prefix(max_length, positions, labels):
    tok = CharTokenizer()
    enc = encode(tok, "Q", ["ab", "cd", "e"], labels=[1, 1, 0], max_length=max_length)
    assert len(enc.input_ids) == min(max_length, 15)
    assert enc.readout_positions == positions
    assert enc.labels == labels
    assert enc.truncated == (max_length < 15)
    assert enc.num_steps == 3
    assert enc.steps == ["ab", "cd", "e"][: len(positions)]  # the canonical steps that kept their SEP


def test_truncation_with_real_tokenizer_keeps_invariant(tiny_prm):
    tok = tiny_prm.tokenizer
    steps = [f"Step {i}: {i} + {i} = {2 * i}." for i in range(6)]
    full = encode_trajectory(tok, "Q", steps, sep=SEP, system_prompt="S", labels=[1] * 5 + [0])
    cut_at = full.readout_positions[2] + 3  # mid-trajectory: inside step 3
    enc = encode_trajectory(tok, "Q", steps, sep=SEP, system_prompt="S", labels=[1] * 5 + [0], max_length=cut_at)
    assert enc.input_ids == full.input_ids[:cut_at]
    assert enc.readout_positions == full.readout_positions[:3]
    assert enc.labels == [1, 1, 1]
    assert enc.truncated


# -- labels -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, m, labels",
    [(-1, 3, [1, 1, 1]), (0, 3, [0]), (1, 3, [1, 0]), (2, 3, [1, 1, 0]), (-1, 1, [1]), (0, 1, [0])],
)
def test_labels_from_first_error(k, m, labels):
    assert labels_from_first_error(k, m) == labels
    assert first_error_from_labels(labels) == k


@pytest.mark.parametrize("k, m", [(3, 3), (-2, 3), (0, 0)])
def test_labels_from_first_error_out_of_range(k, m):
    with pytest.raises(StepFormatError, match="out of range"):
        labels_from_first_error(k, m)


@pytest.mark.parametrize("k", [1.0, "1", True, None])
def test_labels_from_first_error_rejects_non_int(k):
    with pytest.raises(StepFormatError, match="must be an int"):
        labels_from_first_error(k, 3)


def test_steps_after_first_error_are_dropped():
    tok = CharTokenizer()
    # First error at step 1 of 3: the input keeps steps 0 and 1 only.
    enc = encode(tok, "Q", ["ab", "cd", "e"], labels=labels_from_first_error(1, 3))
    assert enc.input_ids == chars("[S][Q]>ab") + [SEP_ID] + chars("cd") + [SEP_ID]
    assert enc.readout_positions == [9, 12]
    assert enc.labels == [1, 0]
    assert enc.num_steps == 2


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question, steps, message",
    [
        ("Q", [], "steps is empty"),
        ("Q", ["a", 3], "step 1 must be a string, got int"),
        ("Q", ["a", None], "step 1 must be a string, got NoneType"),
        ("Q", "a single string", "steps must be a list of strings, got str"),
        ("Q", None, "steps must be a list of strings, got NoneType"),
        (None, ["a"], "question must be a string, got NoneType"),
        ("Q", ["a", "  \n\n "], "step 1 is empty after normalisation"),
    ],
)
def test_bad_rows_get_specific_errors(question, steps, message):
    with pytest.raises(StepFormatError, match=message):
        encode(CharTokenizer(), question, steps)


def test_more_labels_than_steps_is_rejected():
    with pytest.raises(StepFormatError, match="3 labels for 2 steps"):
        encode(CharTokenizer(), "Q", ["a", "b"], labels=[1, 1, 0])


# -- collation --------------------------------------------------------------------------------------------------


def test_collate_pads_and_flattens_readouts():
    rows = [
        {"input_ids": [5, 6, 7], "readout_positions": [1, 2], "labels": [1, 0]},
        {"input_ids": [8], "readout_positions": [0], "labels": [1]},
        {"input_ids": [9, 9], "readout_positions": [], "labels": []},  # a truncated row with no SEP left
    ]
    out = collate_encoded(rows, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["readout_batch"].tolist() == [0, 0, 1]
    assert out["readout_pos"].tolist() == [1, 2, 0]
    assert out["labels"].tolist() == [1.0, 0.0, 1.0]


def test_collate_omits_labels_unless_every_row_has_them():
    rows = [{"input_ids": [1], "readout_positions": [0], "labels": [1]}, {"input_ids": [2], "readout_positions": [0]}]
    assert "labels" not in collate_encoded(rows, pad_id=0)


def test_padding_fraction_hand_computed():
    # Batches [4, 2] -> 8 slots, 2 padded; [3] -> 3 slots, 0 padded: 2 / 11.
    assert padding_fraction([4, 2, 3], batch_size=2) == pytest.approx(2 / 11)
    assert padding_fraction([], batch_size=2) == 0.0
