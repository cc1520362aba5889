"""Adapters that turn other first-error datasets into ProcessBench-style samples (question, steps, 0-based label).

Supported (`eval.benchmarks=[first_error] eval.format=<name>`), all under ../shared/data/step_labeled_extra/:

| name                | default path                                          | label source                                   |
|---------------------|-------------------------------------------------------|------------------------------------------------|
| big_bench_mistake   | big_bench_mistake/ (5 task files = 5 subsets)         | `mistake_index` (0-based; null -> -1)           |
| reasoneval_invalid  | reasoneval_meta_reasoning/mr-math_invalid_errors.jsonl| `model_output_solution_first_error_step` (1-based; "N/A" -> -1) |
| mr_ben              | mr_ben/math.json                                      | `Model_Solution_First_Error_Step` (1-based string; "N/A" -> -1) |
| champ_fws           | champ_fws/champ_fws.jsonl                             | `label` (0-based, -1)                           |
| mr_gsm8k_partial    | mr_gsm8k_partial/mr_gsm8k_wrong_solutions_subset.jsonl| `model_output_solution_first_error_step` (1-based) |

Not supported, because they carry no honest first-error label: ReasonEval `mr-math_redundant_errors` (per-step
redundancy ratings, not correctness) and `perturbation` (synthetic edits; "repeat step" or "swap solutions" do
not make the tagged step the first wrong one).

Caveat: mr_gsm8k_partial holds wrong solutions only, so acc_cor is undefined there (reported as 0 with a
warning) and only acc_err is meaningful. MR-Ben questions are multiple choice: the options are appended to the
question. MR-Ben, MR-GSM8K and ReasonEval steps carry "Step k:" / "k." numbering, which is stripped as for PRMBench.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from actprm_ray.config import shared_data_dir
from actprm_ray.eval.prmbench import strip_step_prefix
from actprm_ray.eval.processbench import check_first_error_label
from actprm_ray.eval.samples import (
    EvalDataError,
    EvalSample,
    LoadResult,
    is_int,
    read_jsonl,
    require_fields,
    stratified_spread,
    string_steps,
)

NO_ERROR = ("N/A", "n/a", "NA", "none", "None", "")


def one_based_to_label(value: object) -> tuple[int | None, str | None]:
    """1-based step number (int or digit string) or an explicit "no error" marker -> (0-based label, reason)."""
    if value is None or (isinstance(value, str) and value.strip() in NO_ERROR):
        return -1, None
    if is_int(value):
        return value - 1, None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip()) - 1, None
    return None, f"first-error step {value!r} is not a 1-based step number or 'N/A'"


# Each reader yields (source, EvalSample or a skip reason str, row id) for one file.
Reader = Callable[[Path, str, LoadResult], Iterator[tuple[str, "EvalSample | str", object]]]


def _sample(sid: str, subset: str, question: object, steps: object, label: object) -> EvalSample | str:
    """Validate and build one sample; a str return is the reason it is unusable."""
    if not isinstance(question, str):
        return f"question must be a string, got {type(question).__name__}"
    reason = string_steps(steps) or check_first_error_label(label, len(steps))
    return reason or EvalSample(id=sid, subset=subset, question=question, steps=list(steps), label=label)


def _big_bench_mistake(path: Path, subset: str, result: LoadResult):
    for source, row in read_jsonl(path, result):
        require_fields(row, ("input", "steps", "mistake_index"), source)
        k = row["mistake_index"]
        label = -1 if k is None else k
        yield source, _sample(f"{subset}-{source.rsplit(':', 1)[1]}", subset, row["input"], row["steps"], label), None


def _reasoneval_invalid(path: Path, subset: str, result: LoadResult):
    for source, row in read_jsonl(path, result):
        require_fields(row, ("id", "question", "model_output_step_format", "model_output_solution_first_error_step"), source)
        label, reason = one_based_to_label(row["model_output_solution_first_error_step"])
        raw = row["model_output_step_format"]
        if reason is None and not (isinstance(raw, list) and all(isinstance(s, list) for s in raw)):
            reason = "model_output_step_format must be a list of lists of sentences"
        if reason:
            yield source, reason, row["id"]
            continue
        # Each step is stored as a list of sentences; a step is their concatenation, minus its "k." numbering.
        steps = [strip_step_prefix(" ".join(str(x) for x in s)) for s in raw]
        yield source, _sample(f"reasoneval-{row['id']}", subset, row["question"], steps, label), row["id"]


def _mr_ben(path: Path, subset: str, result: LoadResult):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: expected an object mapping question ids to solution lists")
    for uuid, solutions in data.items():
        for i, sol in enumerate(solutions if isinstance(solutions, list) else []):
            source = f"{path.name}:{uuid}[{i}]"
            if not isinstance(sol, dict):
                yield source, f"solution is a {type(sol).__name__}, not an object", uuid
                continue
            require_fields(sol, ("Question", "Model_Solution_Steps", "Model_Solution_First_Error_Step"), source)
            label, reason = one_based_to_label(sol["Model_Solution_First_Error_Step"])
            if reason:
                yield source, reason, uuid
                continue
            question = sol["Question"]
            if isinstance(question, str) and sol.get("Options"):
                question = f"{question}\n{sol['Options']}"
            steps = sol["Model_Solution_Steps"]
            if isinstance(steps, list):
                steps = [strip_step_prefix(s) if isinstance(s, str) else s for s in steps]
            yield source, _sample(f"mrben-{uuid}-{i}", subset, question, steps, label), uuid


def _champ_fws(path: Path, subset: str, result: LoadResult):
    for source, row in read_jsonl(path, result):
        require_fields(row, ("id", "problem", "steps", "label"), source)
        yield source, _sample(str(row["id"]), subset, row["problem"], row["steps"], row["label"]), row["id"]


def _mr_gsm8k(path: Path, subset: str, result: LoadResult):
    for source, row in read_jsonl(path, result):
        require_fields(row, ("uuid", "question", "model_output_steps", "model_output_solution_first_error_step"), source)
        label, reason = one_based_to_label(row["model_output_solution_first_error_step"])
        if reason:
            yield source, reason, row["uuid"]
            continue
        steps = row["model_output_steps"]
        if isinstance(steps, list):
            steps = [strip_step_prefix(s) if isinstance(s, str) else s for s in steps]
        yield source, _sample(f"mrgsm8k-{row['uuid']}", subset, row["question"], steps, label), row["uuid"]


@dataclass(frozen=True)
class FirstErrorFormat:
    default_path: str  # relative to shared/data/step_labeled_extra; a directory means "every *.jsonl, one subset each"
    reader: Reader


FORMATS: dict[str, FirstErrorFormat] = {
    "big_bench_mistake": FirstErrorFormat("big_bench_mistake", _big_bench_mistake),
    "reasoneval_invalid": FirstErrorFormat("reasoneval_meta_reasoning/mr-math_invalid_errors.jsonl", _reasoneval_invalid),
    "mr_ben": FirstErrorFormat("mr_ben/math.json", _mr_ben),
    "champ_fws": FirstErrorFormat("champ_fws/champ_fws.jsonl", _champ_fws),
    "mr_gsm8k_partial": FirstErrorFormat("mr_gsm8k_partial/mr_gsm8k_wrong_solutions_subset.jsonl", _mr_gsm8k),
}


def load_first_error(fmt: str, path: str | Path | None = None, limit: int | None = None) -> LoadResult:
    """Load a first-error dataset in format `fmt`; `limit` keeps N usable samples per subset
    (correct and erroneous rows in proportion, each evenly spread).

    A file path is one subset named after the format; a directory contributes one subset per *.jsonl file
    (named after the file stem), which is how BIG-Bench Mistake's five tasks are reported separately.
    """
    if fmt not in FORMATS:
        raise EvalDataError(f"unknown first-error format {fmt!r}; supported: {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    path = Path(path) if path is not None else shared_data_dir() / "step_labeled_extra" / spec.default_path
    if path.is_dir():
        files = [(p, p.stem) for p in sorted(path.glob("*.jsonl")) if p.is_file()]
        if not files:
            raise EvalDataError(f"{fmt}: no *.jsonl files in {path}")
    elif path.is_file():
        files = [(path, fmt)]
    else:
        raise EvalDataError(f"{fmt}: file not found: {path}")
    result = LoadResult(samples=[])
    for file, subset in files:
        subset_samples = []
        for source, item, row_id in spec.reader(file, subset, result):
            if isinstance(item, str):
                result.skip(source, item, row_id)
                continue
            subset_samples.append(item)
        result.samples += stratified_spread(subset_samples, limit, key=lambda x: x.label == -1)
    subsets = [s for _, s in files]
    result.stats = {
        "format": fmt,
        "samples": len(result.samples),
        "steps": sum(len(s.steps) for s in result.samples),
        "per_subset": {s: sum(x.subset == s for x in result.samples) for s in subsets},
        "skipped": len(result.skipped),
    }
    return result
