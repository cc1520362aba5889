"""Pure checks of one row: is a pool row or a labelled row usable, and why not. No tokenizer, no Ray.

The stages (pipeline/stages.py), the label job and supervised training call these per row and turn the reason
into an invalid row (a StepFormatError's message, or check_hard_labels' string). What needs the tokenizer (does
a separator survive truncation?) stays in CanonicalizeStage; what needs the file (bad JSON, a wrong Arrow type)
is the reader's (data/shards.py).

    >>> row, k = check_pool_row("What is 2+3?", ["2+3=5.", "So 5."], 1, sep="<extra_0>")
    >>> row.steps, k
    (['2+3=5.', 'So 5.'], 1)
    >>> training_labels(None, 1, num_steps_given=2, visible_steps=2)
    [1, 0]
"""

from __future__ import annotations

from actprm_ray.data.step_format import (CanonicalRow, StepFormatError, canonicalize, labels_from_first_error,
                                         parse_first_error_step)

# oracle_first_error_step of a row without one. The value label/base.py's NO_LABEL has, so a labelled set's
# first_error_step, written back, reads as "none" too.
NO_ORACLE = -2


def check_pool_row(question, steps, first_error_step, *, sep: str, read_error: str = "") -> tuple[CanonicalRow, int]:
    """Everything about a pool row that needs no tokenizer: the reader's verdict, types, canonical text, and the
    oracle's first error in range (-1..m-1, or NO_ORACLE). Raises StepFormatError with the reason."""
    if read_error:
        raise StepFormatError(read_error)
    k = parse_first_error_step(first_error_step)
    k = NO_ORACLE if k is None else k  # NO_ORACLE itself also means none: the labelled rows' sentinel
    row = canonicalize(question, steps, sep)
    if k != NO_ORACLE and not -1 <= k < len(row.steps):
        raise StepFormatError(f"first_error_step {k} out of range for {len(row.steps)} steps (-1..{len(row.steps) - 1})")
    return row, k


def check_hard_labels(labels: list, num_steps: int) -> str:
    """"" if `labels` is a METHOD §1 labelling of a row with num_steps steps, else why not.

    Valid: 1..num_steps values in {0, 1} with nothing after the first 0 ([1, 1, 0] or [1, 1, 1]). A shorter
    all-ones list labels a prefix; the trainer cuts the input after the last labelled step either way.
    """
    if len(labels) == 0:
        return "hard_labels is empty"
    if any(y not in (0, 1) for y in labels):
        return f"hard_labels must be 0/1, got {sorted(set(labels) - {0, 1})}"
    if len(labels) > num_steps:
        return f"{len(labels)} hard_labels for {num_steps} steps"
    if 0 in labels and labels.index(0) != len(labels) - 1:
        return "hard_labels continue after the first error (METHOD §1 ends them at the first 0)"
    return ""


def training_labels(hard_labels: list[int] | None, oracle_first_error_step: int, *, num_steps_given: int,
                    visible_steps: int) -> list[int]:
    """A labelled row's labels for training, cut to the steps that survive truncation. Raises StepFormatError.

    The row's own hard_labels (checked against the steps as given) win; without them (None or empty) its first
    error, already range-checked and cut to the visible steps by CanonicalizeStage, gives the labels."""
    if hard_labels:
        why = check_hard_labels(hard_labels, num_steps_given)
        if why:
            raise StepFormatError(why)
        return hard_labels[:visible_steps]
    if oracle_first_error_step != NO_ORACLE:
        return labels_from_first_error(oracle_first_error_step, visible_steps)
    raise StepFormatError("row has no label: needs hard_labels or first_error_step")
