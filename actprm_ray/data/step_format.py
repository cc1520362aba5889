"""The one canonical step format (METHOD §2), used by training, scoring, evaluation and the judge.

A trajectory is laid out as a chat:

    system    = config string (default: DEFAULT_SYSTEM_PROMPT)
    user      = question
    assistant = x_0 SEP x_1 SEP ... x_{m-1} SEP      (a separator after *every* step)

and the PRM reads one score at each SEP of the assistant span. Worked example with SEP = "<extra_0>":

    >>> normalize_step("  First,\\n\\n  add 2 and 3. ")
    'First, add 2 and 3.'
    >>> assistant_text(["a", "b"], "<extra_0>")
    'a<extra_0>b<extra_0>'

`encode_trajectory` returns input ids plus the read-out positions; the invariant
len(readout_positions) == len(labels) (after truncation) is checked on every row.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np

DEFAULT_SEP = "<extra_0>"
DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# A whitespace run holding two or more newlines is a paragraph break; inside a step it becomes one space,
# because SEP's embedding is seeded from "\n\n" and a surviving blank line would look like a separator.
_BLANK_LINE_RUN = re.compile(r"\s*\n\s*\n\s*")


class StepFormatError(ValueError):
    """A row that cannot be put into the canonical format (the reason is the message)."""


def normalize_step(text: str) -> str:
    """Strip outer whitespace and fold every internal blank-line break into one space."""
    return _BLANK_LINE_RUN.sub(" ", text.strip())


def sanitize(text: str, sep: str) -> tuple[str, int]:
    """Remove every literal occurrence of the separator string; return (clean text, removals)."""
    count = 0
    # Repeat: one removal can join two halves into a new separator ("<extra_<extra_0>0>" -> "<extra_0>").
    while sep and sep in text:
        count += text.count(sep)
        text = text.replace(sep, "")
    return text, count


def assistant_text(steps: list[str], sep: str) -> str:
    return "".join(step + sep for step in steps)


def labels_from_first_error(first_error_step: int, num_steps: int) -> list[int]:
    """METHOD §1: k = -1 -> all ones; k >= 0 -> [1]*k + [0] (steps after k are dropped from the input)."""
    if not isinstance(first_error_step, int) or isinstance(first_error_step, bool):
        raise StepFormatError(f"first_error_step must be an int, got {type(first_error_step).__name__}")
    if first_error_step < -1 or first_error_step >= num_steps:
        raise StepFormatError(f"first_error_step {first_error_step} out of range for {num_steps} steps")
    if first_error_step == -1:
        return [1] * num_steps
    return [1] * first_error_step + [0]


def first_error_from_labels(labels: list[int]) -> int:
    """Inverse of labels_from_first_error: index of the first 0, or -1."""
    for i, y in enumerate(labels):
        if y == 0:
            return i
    return -1


@dataclass
class CanonicalRow:
    question: str
    steps: list[str]
    sep_removed: int = 0  # how many literal separators were stripped from question + steps


def check_text(text: str, what: str) -> None:
    """Reject text no reasoning trace contains: a NUL marks binary or corrupt data (and C-string consumers such
    as judge servers may cut the text there, so the judge would read less than the PRM); an unpaired surrogate
    is not Unicode at all and the tokenizer cannot encode it."""
    if "\x00" in text:
        raise StepFormatError(f"{what} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise StepFormatError(f"{what} is not valid Unicode (unpaired surrogate at character {e.start})") from None


def parse_int(value: object, name: str) -> int | None:
    """`value` as an int; None when it has none: None, or NaN (how a float column, e.g. from pandas, writes a
    missing int). Any other value must be a whole number, else StepFormatError naming `name`."""
    if isinstance(value, np.generic):
        value = value.item()  # a numpy scalar: judge (and name) the Python value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        raise StepFormatError(f"{name} must be an integer, got bool {value}")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    raise StepFormatError(f"{name} must be an integer, got {type(value).__name__} {value!r}")


def parse_first_error_step(value: object) -> int | None:
    """A row's first_error_step as an int, or None when it has none (parse_int). The range depends on the
    steps: callers check it."""
    return parse_int(value, "first_error_step")


def check_types(question: object, steps: object) -> list:
    """The types a trajectory needs (question a string, steps a list of strings); returns steps as a list.
    Raises StepFormatError naming the field and the type found."""
    if not isinstance(question, str):
        raise StepFormatError(f"question must be a string, got {type(question).__name__}")
    # A mapping or set is iterable too, but its keys are not an ordered list of steps.
    if isinstance(steps, (str, bytes, Mapping, AbstractSet)) or not hasattr(steps, "__iter__"):
        raise StepFormatError(f"steps must be a list of strings, got {type(steps).__name__}")
    steps = list(steps)
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise StepFormatError(f"step {i} must be a string, got {type(s).__name__}")
    return steps


def canonicalize(question: object, steps: object, sep: str) -> CanonicalRow:
    """Validate types, normalise and sanitise one trajectory. Raises StepFormatError with a specific reason."""
    steps = check_types(question, steps)
    if not steps:
        raise StepFormatError("steps is empty")
    for i, s in enumerate(steps):
        check_text(s, f"step {i}")
    check_text(question, "question")
    question, removed = sanitize(normalize_step(question), sep)
    if not question.strip():
        raise StepFormatError("question is empty after normalisation")
    clean_steps = []
    for i, s in enumerate(steps):
        s, n = sanitize(normalize_step(s), sep)
        removed += n
        s = normalize_step(s)
        if not s:
            raise StepFormatError(f"step {i} is empty after normalisation")
        clean_steps.append(s)
    return CanonicalRow(question=question, steps=clean_steps, sep_removed=removed)


def prompt_messages(question: str, system_prompt: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def separator_id(tokenizer, sep: str) -> int:
    """The separator's token id; StepFormatError if the tokenizer lacks it.

    O(1) per row: HF maps a missing token to the unknown token's id (or None), which is what we test for.
    `sep in tokenizer.get_vocab()` would copy the whole vocabulary on every row (~0.1 s on SmolLM2's 49k
    tokens, most of a row's encoding time; more on Qwen2.5's 151k).
    """
    sep_id = tokenizer.convert_tokens_to_ids(sep)
    if sep_id is None or sep_id == getattr(tokenizer, "unk_token_id", None):
        raise StepFormatError(f"tokenizer has no separator token {sep!r}; call add_separator_token first")
    return sep_id


@dataclass
class EncodedRow:
    input_ids: list[int]
    readout_positions: list[int]  # indices into input_ids of the surviving assistant-span SEPs
    labels: list[int] | None = None  # cut to len(readout_positions) when given
    num_steps: int = 0  # steps before truncation
    truncated: bool = False
    sep_removed: int = 0
    steps: list[str] = field(default_factory=list)  # canonical steps whose SEP survived truncation
    question: str = ""  # canonical question


def encode_trajectory(
    tokenizer,
    question: str,
    steps: list[str],
    *,
    sep: str,
    system_prompt: str,
    labels: list[int] | None = None,
    max_length: int | None = None,
) -> EncodedRow:
    """Canonicalise, lay out and tokenise one trajectory.

    The prompt part (system + user + generation prompt) and the assistant part are tokenised separately and
    concatenated, so the boundary is exact and SEPs inside the prompt are never read out (the "skip the
    first c separators" rule of METHOD §2, applied by construction). With `max_length` the ids are cut on
    the right and labels keep the prefix that still has a SEP; a row with no surviving SEP returns
    readout_positions == [].
    """
    row = canonicalize(question, steps, sep)
    if labels is not None and len(labels) > len(row.steps):
        raise StepFormatError(f"{len(labels)} labels for {len(row.steps)} steps")
    if labels is not None:
        # Steps after the first error are dropped from the input (METHOD §1).
        row.steps = row.steps[: len(labels)]
    sep_id = separator_id(tokenizer, sep)
    prompt = tokenizer.apply_chat_template(
        prompt_messages(row.question, system_prompt), tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(assistant_text(row.steps, sep), add_special_tokens=False)["input_ids"]
    positions = [len(prompt_ids) + i for i, t in enumerate(answer_ids) if t == sep_id]
    if len(positions) != len(row.steps):
        raise StepFormatError(f"{len(positions)} separators encoded for {len(row.steps)} steps")
    input_ids = prompt_ids + answer_ids
    truncated = False
    if max_length is not None and len(input_ids) > max_length:
        input_ids = input_ids[:max_length]
        positions = [p for p in positions if p < max_length]
        truncated = True
    if labels is not None:
        labels = list(labels[: len(positions)])
        assert len(labels) == len(positions), "separator/label invariant broken"
    return EncodedRow(
        input_ids=input_ids,
        readout_positions=positions,
        labels=labels,
        num_steps=len(row.steps),
        truncated=truncated,
        sep_removed=row.sep_removed,
        steps=row.steps[: len(positions)],
        question=row.question,
    )
