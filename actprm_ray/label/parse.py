"""Parse a judge critique into a first-error index (METHOD §7). Plain string/regex code, never eval.

Rules, in order:
  1. Drop the reasoning section: everything up to the end-of-thinking marker "</think>", if there is one.
  2. Take the first <conclusion>...</conclusion>. None -> INVALID.
  3. Conclusion text "correct" (any case) -> k = -1.
  4. Otherwise k = (number of the last <analysis_j> before the conclusion) - 1; no analysis tag, or j outside
     1..m -> INVALID.
  5. If the conclusion names a paragraph other than j, set `mismatch`; with strict=True that is INVALID.

Worked example (m = 3 steps):

    >>> r = parse_judge_output("<analysis_1>ok</analysis_1><analysis_2>7*3 is 21, not 24</analysis_2>"
    ...                        "<conclusion>Incorrect: paragraph 2</conclusion>", 3)
    >>> r.ok, r.first_error_step, r.hard_labels, r.mismatch
    (True, 1, [1, 0], False)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from actprm_ray.data.step_format import labels_from_first_error
from actprm_ray.label.base import NO_LABEL

THINK_END = "</think>"
THINK_START = "<think>"

_CONCLUSION = re.compile(r"<conclusion>(.*?)</conclusion>", re.DOTALL | re.IGNORECASE)
_ANALYSIS_OPEN = re.compile(r"<analysis_(\d+)>", re.IGNORECASE)
_NAMED_PARAGRAPH = re.compile(r"paragraph[\s_#:]*(\d+)", re.IGNORECASE)
_ANY_INTEGER = re.compile(r"\d+")
# Decoration a judge may wrap a one-word verdict in ("Correct.", "**Correct**"); stripped before comparing.
_VERDICT_DECORATION = " \t\r\n.*_`'\"!"


@dataclass
class ParseResult:
    """Outcome of parsing one critique. On failure first_error_step == NO_LABEL and hard_labels == []."""

    first_error_step: int
    hard_labels: list[int] = field(default_factory=list)
    ok: bool = False
    reason: str = ""
    mismatch: bool = False


def _invalid(reason: str, mismatch: bool = False) -> ParseResult:
    return ParseResult(first_error_step=NO_LABEL, hard_labels=[], ok=False, reason=reason, mismatch=mismatch)


def strip_thinking(text: str) -> tuple[str, str | None]:
    """Return (answer part, error). The answer is what follows the LAST "</think>".

    The last marker, not the first: the thinking is long free text that may quote the marker, while the
    answer after it is short and structured. An opened "<think>" that never closes means the judge ran out
    of tokens mid-thought, so there is no answer at all (its draft tags must not be read as a verdict).
    """
    end = text.rfind(THINK_END)
    if end >= 0:
        return text[end + len(THINK_END):], None
    if THINK_START in text:
        return "", "thinking section never finished (no </think>)"
    return text, None


def _named_index(conclusion: str) -> int | None:
    """The paragraph number a conclusion names ("Incorrect: paragraph 3" -> 3), or None."""
    named = _NAMED_PARAGRAPH.search(conclusion)
    if named:
        return int(named.group(1))
    bare = _ANY_INTEGER.search(conclusion)
    return int(bare.group(0)) if bare else None


def parse_judge_output(text: str, num_steps: int, *, strict: bool = False) -> ParseResult:
    """Parse one judge output for a trajectory of `num_steps` steps (see the module docstring for the rules).

    Raises ValueError only for a caller bug (num_steps < 1); every problem with the text is an INVALID result
    with a specific reason.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if text is None or not text.strip():
        return _invalid("empty judge output")
    answer, err = strip_thinking(text)
    if err:
        return _invalid(err)
    if not answer.strip():
        return _invalid("nothing after the thinking section")

    conclusion_match = _CONCLUSION.search(answer)
    if conclusion_match is None:
        return _invalid("no <conclusion>...</conclusion> tag")
    conclusion = conclusion_match.group(1)
    verdict = conclusion.strip(_VERDICT_DECORATION).lower()
    if verdict == "correct":
        return ParseResult(first_error_step=-1, hard_labels=[1] * num_steps, ok=True)

    # Only analyses written before the verdict count: text after it is not part of the critique.
    analyses = _ANALYSIS_OPEN.findall(answer, 0, conclusion_match.start())
    if not analyses:
        return _invalid(f"conclusion {conclusion.strip()[:60]!r} is not 'Correct' and there is no <analysis_j> tag")
    j = int(analyses[-1])
    if not 1 <= j <= num_steps:
        return _invalid(f"last analysis is paragraph {j}, outside 1..{num_steps}")

    named = _named_index(conclusion)
    mismatch = named is not None and named != j
    if mismatch and strict:
        return _invalid(f"conclusion names paragraph {named} but the last analysis is paragraph {j}", mismatch=True)
    k = j - 1
    labels = labels_from_first_error(k, num_steps)
    return ParseResult(first_error_step=k, hard_labels=labels, ok=True, mismatch=mismatch)
