"""The judge prompt (METHOD §7): our own text with the ProcessBench critique structure, sent as the user turn.

Bump PROMPT_VERSION (config.JUDGE_PROMPT_VERSION, where the config's default reads it) whenever the text or the
tag format changes: it is part of the label-cache key, so a new prompt never reuses critiques written for the old
one. tests/test_judge_parse.py pins the rendered prompt to the version.

The judge sees the same canonical text as the PRM (step_format.canonicalize: outer whitespace stripped,
blank-line breaks folded, separator strings removed), so a label always refers to exactly the steps we train on.
"""

from __future__ import annotations

from actprm_ray.config import JUDGE_PROMPT_VERSION as PROMPT_VERSION
from actprm_ray.data.step_format import DEFAULT_SEP, canonicalize

_INSTRUCTIONS_HEAD = (
    "Review the solution to the math problem below. Its paragraphs are numbered from 1.\n\n"
)
_INSTRUCTIONS_TAIL = (
    "Check the paragraphs in order. For each paragraph j that you check, write your critique of it as "
    "<analysis_j>...</analysis_j>. Stop after the first paragraph that contains an error (a wrong calculation, "
    "a false statement, or a step that does not follow from what came before). Finish with "
    "<conclusion>Correct</conclusion> if no paragraph is wrong, otherwise with "
    "<conclusion>Incorrect: paragraph j</conclusion>, where j is the first wrong paragraph."
)


def canonical_judge_input(question: object, steps: object, sep: str = DEFAULT_SEP) -> tuple[str, list[str]]:
    """Canonical (question, steps) as judged and hashed. Raises StepFormatError for an unusable row."""
    row = canonicalize(question, steps, sep)
    return row.question, row.steps


def render_judge_prompt(question: str, steps: list[str]) -> str:
    """Lay out already-canonical text. Use build_judge_prompt unless the input is known to be canonical."""
    paragraphs = "".join(f"<paragraph_{j}>\n{s}\n</paragraph_{j}>\n\n" for j, s in enumerate(steps, start=1))
    return f"{_INSTRUCTIONS_HEAD}<problem>\n{question}\n</problem>\n\n{paragraphs}{_INSTRUCTIONS_TAIL}"


def build_judge_prompt(question: object, steps: object, sep: str = DEFAULT_SEP) -> str:
    """The judge's user-turn text for one trajectory (canonicalised first). Raises StepFormatError."""
    q, s = canonical_judge_input(question, steps, sep)
    return render_judge_prompt(q, s)


def guided_regex(num_steps: int, max_analysis_chars: int | None = None) -> str:
    """A regex that accepts exactly the well-formed critiques of a num_steps-paragraph solution.

    Shape: analyses 1..j in order, then either "Incorrect: paragraph j" (stopping at the first error), or,
    after all m analyses, "Correct". Every string it accepts parses with mismatch=False and j in 1..m, so
    guided decoding turns every generated critique into a label (METHOD §7 parse rules). The alternatives
    nest, so the pattern grows linearly in m:

        A1 ( A2 ( ... Am ( Correct | Incorrect m ) ... | Incorrect 2 ) | Incorrect 1 )

    A critique body may contain "<" (math: "x < 3") but not "</" or "<<", which keeps the closing tag the
    only way out. `max_analysis_chars` bounds each body (a random or rambling model would otherwise fill
    max_tokens and be cut off mid-tag); None leaves it unbounded.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    reps = "*" if max_analysis_chars is None else f"{{0,{int(max_analysis_chars)}}}"
    body = rf"(?:[^<]|<[^/<]){reps}"

    def analysis(j: int) -> str:
        return rf"<analysis_{j}>{body}</analysis_{j}>\n"

    def incorrect(j: int) -> str:
        return rf"<conclusion>Incorrect: paragraph {j}</conclusion>"

    pattern = analysis(num_steps) + rf"(?:<conclusion>Correct</conclusion>|{incorrect(num_steps)})"
    for j in range(num_steps - 1, 0, -1):
        pattern = analysis(j) + rf"(?:{pattern}|{incorrect(j)})"
    return pattern
