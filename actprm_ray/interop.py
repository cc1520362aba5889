"""TRL / HF `datasets` interop: labelled rows out as a TRL stepwise-supervision dataset; pools in from that format
and from Math-Shepherd (docs/INTEROP.md has the field mapping).

    export-trl            label job output | finished active run | labelled pool  ->  prompt, completions, labels
    import-trl            prompt, completions, labels (+ optional id)               ->  pool (id, question, steps,
    import-math-shepherd  input + label with a step tag ("ки" -> "+"/"-")               first_error_step)

Worked example (METHOD §1: labels are first-error shaped; steps after the first error are dropped):

    >>> trl_row("2+2?", ["2+2=5.", "So 5."], 0, sep="<extra_0>")
    {'prompt': '2+2?', 'completions': ['2+2=5.'], 'labels': [False]}
    >>> pool_row("r1", "2+2?", ["2+2=4.", "Done."], [True, True], sep="<extra_0>")
    ({'id': 'r1', 'question': '2+2?', 'steps': ['2+2=4.', 'Done.'], 'first_error_step': -1}, '')

Every input row ends up in exactly one place: the output, or `_skipped.jsonl` with its locator and a reason
(the counts are in `_report.json` and printed). Nothing here imports Ray; `datasets` is needed only to write
or read a `save_to_disk` folder (the `hf` extra).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, fields
from itertools import accumulate
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actprm_ray.data.shards import POOL_COLUMNS, Chunk, index_pool, read_chunk
from actprm_ray.data.step_format import (DEFAULT_SEP, StepFormatError, canonicalize, first_error_from_labels,
                                         labels_from_first_error, parse_first_error_step)

POOL_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("steps", pa.list_(pa.string())),
                         ("first_error_step", pa.int64())])
TRL_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("completions", pa.list_(pa.string())),
                        ("labels", pa.list_(pa.bool_()))])
MATH_SHEPHERD_TAG = "ки"
AFTER_ERROR = ("drop", "false")
# A note (not a skip): the row's labels had a True after the first False; the pool keeps only the first error.
NOT_FIRST_ERROR_SHAPE = "labels_not_first_error_shape"


def _datasets():
    """The `datasets` package, or an error that says how to get it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("HF datasets interop needs the `hf` extra: pip install -e '.[hf]' (scripts/install.sh "
                          "installs it)") from e
    return datasets


# -- pure row functions -------------------------------------------------------------------------------------------
def trl_row(question, steps, first_error_step, *, sep: str = DEFAULT_SEP, after_error: str = "drop") -> dict:
    """One labelled trajectory -> a TRL stepwise-supervision row (canonical text, METHOD §2).

    after_error="drop" (METHOD §1, what our trainer sees): completions end at the first error. "false": every step
    is kept and the steps after the first error are labelled False (our convention: they are wrong too).
    Raises StepFormatError with the reason."""
    if after_error not in AFTER_ERROR:
        raise ValueError(f"after_error must be one of {AFTER_ERROR}, got {after_error!r}")
    k = parse_first_error_step(first_error_step)
    if k is None:
        raise StepFormatError("no label: first_error_step is null")
    row = canonicalize(question, steps, sep)
    labels = [bool(y) for y in labels_from_first_error(k, len(row.steps))]
    if after_error == "false":
        labels += [False] * (len(row.steps) - len(labels))
    return {"prompt": row.question, "completions": row.steps[: len(labels)], "labels": labels}


def check_labels(labels, num_steps: int) -> list[bool]:
    """TRL labels as a list of bools: bool (numpy bool too) or 0/1 per step, one per step."""
    if isinstance(labels, (str, bytes, dict)) or not hasattr(labels, "__iter__"):
        raise StepFormatError(f"labels must be a list of booleans, got {type(labels).__name__}")
    out = []
    for i, y in enumerate(labels):
        y = y.item() if isinstance(y, np.generic) else y
        if isinstance(y, bool) or (isinstance(y, int) and y in (0, 1)):
            out.append(bool(y))
        else:
            raise StepFormatError(f"label {i} must be true/false (or 0/1), got {type(y).__name__} {y!r}")
    if len(out) != num_steps:
        raise StepFormatError(f"{len(out)} labels for {num_steps} completions")
    return out


def pool_row(row_id: str, prompt, completions, labels, *, sep: str = DEFAULT_SEP) -> tuple[dict, str]:
    """One TRL row -> (pool row, note). first_error_step = index of the first False, -1 if none.

    Labels of another shape (a True after the first False, e.g. Math-Shepherd's Monte-Carlo labels) keep only
    the first error, because our labels are first-error shaped (METHOD §1); the note says so. The text is
    validated as CanonicalizeStage would (empty steps, NUL, ...) but written as given. Raises StepFormatError."""
    if isinstance(prompt, list):
        raise StepFormatError("conversational prompt (a list of messages) is not supported: give the question text")
    steps = list(completions) if isinstance(completions, (list, tuple, np.ndarray)) else completions
    canonicalize(prompt, steps, sep)  # raises with the reason
    labels = check_labels(labels, len(steps))
    k = first_error_from_labels([int(y) for y in labels])
    note = NOT_FIRST_ERROR_SHAPE if k >= 0 and any(labels[k + 1:]) else ""
    return {"id": str(row_id), "question": prompt, "steps": steps, "first_error_step": k}, note


def parse_math_shepherd(text: str, label: str, *,
                        step_tag: str = MATH_SHEPHERD_TAG) -> tuple[str, list[str], list[bool]]:
    """Math-Shepherd's `input` / `label` pair -> (question, steps, labels).

    `input` is the question followed by the steps, each ending with `step_tag`; `label` is the same text with
    each tag replaced by "+" (correct) or "-" (wrong). The question ends where "Step 1:" (any case) begins; a row
    without that marker, or with a tag before it, is rejected rather than guessed at.

    >>> parse_math_shepherd("Q? Step 1: a ки\\nStep 2: b ки", "Q? Step 1: a +\\nStep 2: b -")
    ('Q?', ['Step 1: a', 'Step 2: b'], [True, False])
    """
    if not isinstance(text, str) or not isinstance(label, str):
        raise StepFormatError(f"input and label must be strings, got {type(text).__name__}, {type(label).__name__}")
    if not step_tag:
        raise ValueError("step_tag is empty")
    parts = text.split(step_tag)  # n tags -> n + 1 parts; the last is what follows the last tag
    if len(parts) < 2:
        raise StepFormatError(f"input has no step tag {step_tag!r}")
    if parts[-1].strip():
        raise StepFormatError(f"text after the last step tag: {parts[-1].strip()[:40]!r}")
    # In the label text each tag is one "+"/"-" character: tag j sits after parts 0..j and j earlier marks.
    if len(label) != len(text) - (len(step_tag) - 1) * (len(parts) - 1):
        raise StepFormatError("label does not line up with input (lengths differ once each tag is one character)")
    marks = [label[end + j] for j, end in enumerate(accumulate(len(part) for part in parts[:-1]))]
    bad = [j for j, m in enumerate(marks) if m not in ("+", "-")]
    if bad:
        raise StepFormatError(f"label has {marks[bad[0]]!r} at step tag {bad[0]}, not '+' or '-'")
    first = parts[0]
    at = first.lower().find("step 1:")
    if at < 0:
        raise StepFormatError("cannot tell the question from the first step: no 'Step 1:' before the first step tag")
    question, steps = first[:at].strip(), [first[at:].strip()] + [p.strip() for p in parts[1:-1]]
    if not question:
        raise StepFormatError("question is empty")
    return question, steps, [m == "+" for m in marks]


# -- sources --------------------------------------------------------------------------------------------------------
@dataclass
class Labelled:
    """A labelled trajectory on its way out, or the reason it cannot go (reason != "")."""

    where: str
    id: str
    question: object = None
    steps: object = None
    first_error_step: object = None
    reason: str = ""


def read_pool(path: str) -> Iterator[tuple[str, dict]]:
    """(locator, row) for every row of a pool, through our reader (data/shards.py) without Ray: bad rows carry
    `read_error` exactly as the pipeline would see them."""
    index = index_pool(path)
    seen: Counter = Counter()  # rows so far per shard: the locator is <file>#<row>, 0-based, as the reader's
    for c in index.chunks:
        batch = {f.name: [getattr(c, f.name)] for f in fields(Chunk)}
        out = read_chunk(batch, columns=POOL_COLUMNS, duplicates=index.duplicates)
        for i in range(len(out["id"])):
            row = {k: out[k][i] for k in (*POOL_COLUMNS, "read_error")}
            yield f"{Path(c.path).name}#{seen[c.path]}", row
            seen[c.path] += 1


def from_pool(path: str) -> Iterator[Labelled]:
    """A pool with first_error_step (e.g. ProcessBench-shaped): every row that has a label."""
    for where, r in read_pool(path):
        reason = str(r["read_error"]) or ("no label: first_error_step is null" if r["first_error_step"] is None else "")
        yield Labelled(where, str(r["id"]), r["question"], r["steps"], r["first_error_step"], reason)


def from_label_job(folder: Path) -> Iterator[Labelled]:
    """jobs/label.py output: labelled/*.parquet; only label_status "ok" rows carry a label (steps already cut)."""
    parts = sorted((folder / "labelled").glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder}/labelled/ has no .parquet files (is this a label job's output?)")
    for part in parts:
        for j, r in enumerate(pq.read_table(part).to_pylist()):
            where = f"{part.name}#{j}"
            if r["label_status"] != "ok":
                yield Labelled(where, r["id"], reason=f"label_status {r['label_status']}: {r['label_reason']}")
                continue
            labels = r["hard_labels"] or []
            k = first_error_from_labels(labels)
            if len(labels) != len(r["steps"] or []) or labels != labels_from_first_error(k, len(labels)):
                yield Labelled(where, r["id"], reason=f"hard_labels {labels} do not fit {len(r['steps'] or [])} steps")
                continue
            yield Labelled(where, r["id"], r["question"], r["steps"], k)


def run_config(run_dir: Path) -> dict:
    """The finished run's resolved config (config.yaml), as plain data (older runs' keys are not validated)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


def run_pool_path(run_dir: Path, cfg: dict) -> str:
    """data.pool, or the synthetic pool the run wrote into its folder (data/shards.py resolve_pool)."""
    data = cfg["data"]
    if data.get("pool"):
        return data["pool"]
    path = run_dir / f"synthetic_pool_{data['synthetic_rows']}_{data['synthetic_seed']}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"the run used a synthetic pool and {path} is gone")
    return str(path)


def from_run(run_dir: Path) -> tuple[Iterator[Labelled], dict]:
    """A finished active run's trained rows, rebuilt from what the run keeps (it keeps no steps + labels table):

        outcomes.parquet (outcome == trained, label_key)  +  the pool (config.yaml data.pool)
        + the label: the pool's first_error_step for label_key "oracle:<id>", else the label cache entry
          (labeler.judge.cache_path, default <run>/ledger/labels) with that key.

    The steps are canonicalised with the run's model.sep, as the trainer saw them. Returns (rows, outcome counts)."""
    from actprm_ray.label.cache import OK, LabelCache

    outcomes_path = run_dir / "outcomes.parquet"
    if not outcomes_path.exists():
        raise FileNotFoundError(f"{outcomes_path} not found: not a finished run (a running or killed run has only "
                                f"outcomes/ parts; finish or resume it first)")
    cfg = run_config(run_dir)
    outcomes = pq.read_table(outcomes_path, columns=["id", "outcome", "label_key"]).to_pylist()
    counts = dict(Counter(r["outcome"] for r in outcomes))
    trained = [r for r in outcomes if r["outcome"] == "trained"]
    judge_keys = [r["label_key"] for r in trained if not r["label_key"].startswith("oracle:")]
    entries = {}
    if judge_keys:
        cache = Path(cfg["labeler"]["judge"].get("cache_path") or "ledger/labels")
        cache = cache if cache.is_absolute() or "://" in str(cache) else run_dir / cache
        if not Path(cache).exists() and "://" not in str(cache):
            raise FileNotFoundError(f"the run's label cache {cache} is gone: judged labels cannot be recovered")
        entries = LabelCache(cache).get_many(judge_keys)
    pool = {str(r["id"]): (where, r) for where, r in read_pool(run_pool_path(run_dir, cfg))}
    sep = cfg["model"]["sep"]

    def rows() -> Iterator[Labelled]:
        for r in trained:
            where = f"outcomes.parquet id {r['id']}"
            if r["id"] not in pool:
                yield Labelled(where, r["id"], reason="trained id not in the run's pool (was the pool file changed?)")
                continue
            p = pool[r["id"]][1]
            if r["label_key"].startswith("oracle:"):
                yield Labelled(where, r["id"], p["question"], p["steps"], p["first_error_step"], str(p["read_error"]))
                continue
            e = entries.get(r["label_key"])
            if e is None or e.status != OK:
                yield Labelled(where, r["id"],
                               reason=f"label key {r['label_key'][:16]}... has no ok entry in the label cache")
                continue
            try:
                m = len(canonicalize(p["question"], p["steps"], sep).steps)
            except StepFormatError as err:
                yield Labelled(where, r["id"], reason=str(err))
                continue
            if e.num_steps != m:
                yield Labelled(where, r["id"], reason=f"cache entry judged {e.num_steps} steps, the pool row has {m}")
                continue
            yield Labelled(where, r["id"], p["question"], p["steps"], e.k)

    return rows(), {"outcomes": counts, "sep": sep}


def source_kind(path: Path) -> str:
    """run (outcomes.parquet + config.yaml) | label_job (labelled/) | pool (a pool file or folder)."""
    if path.is_dir() and (path / "config.yaml").exists() and ((path / "outcomes.parquet").exists()
                                                             or (path / "outcomes").is_dir()):
        return "run"
    if path.is_dir() and (path / "labelled").is_dir():
        return "label_job"
    return "pool"


# -- reading TRL / Math-Shepherd files --------------------------------------------------------------------------------
def read_records(path: str, *, split: str | None = None) -> Iterator[tuple[str, object, str]]:
    """(locator, record, error) for every row of a .parquet/.jsonl/.json file, a folder of .parquet files, or a
    `datasets` save_to_disk folder (a DatasetDict needs `split` unless it has one split). A bad JSON line is a
    row with an error, not a crash."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if p.is_dir() and any((p / n).exists() for n in ("state.json", "dataset_dict.json")):
        ds = _datasets().load_from_disk(str(p))
        if isinstance(ds, _datasets().DatasetDict):
            if split is None and len(ds) != 1:
                raise ValueError(f"{path} is a DatasetDict with splits {sorted(ds)}: pass --split")
            split = split or next(iter(ds))
            ds = ds[split]
        for j, rec in enumerate(ds):
            yield f"{p.name}[{split or 'data'}]#{j}", rec, ""
        return
    files = sorted(f for f in p.glob("*.parquet") if not f.name.startswith((".", "_"))) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .parquet files (or save_to_disk dataset) in {path}")
    for f in files:
        if f.suffix == ".parquet":
            for j, rec in enumerate(pq.read_table(f).to_pylist()):
                yield f"{f.name}#{j}", rec, ""
        elif f.suffix in (".jsonl", ".json"):
            with open(f, "rb") as fh:
                for j, raw in enumerate(fh):
                    if not raw.strip():
                        continue
                    try:
                        yield f"{f.name}#{j}", json.loads(raw), ""
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        yield f"{f.name}#{j}", None, f"bad JSON on line {j + 1}: {e}"
        else:
            raise ValueError(f"{f}: use a .parquet, .jsonl or .json file, or a folder")


def _fields(rec, names: tuple[str, ...]) -> tuple[list, str]:
    if not isinstance(rec, dict):
        return [], f"row is a {type(rec).__name__}, not an object"
    missing = [n for n in names if n not in rec]
    return [rec.get(n) for n in names], (f"missing {', '.join(missing)}" if missing else "")


def _record_id(rec, prefix: str, j: int) -> str:
    """The row's own id (a non-empty string or an integer), else <prefix>-<row number>."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    usable = isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip()
    return str(rid) if usable else f"{prefix}-{j}"


# -- the three commands ---------------------------------------------------------------------------------------------
def _write_side(out: Path, skipped: list[dict], report: dict) -> dict:
    """_skipped.jsonl (one line per skipped row: where, id, reason) and _report.json. Underscore names: our pool
    reader ignores them when given the folder."""
    with open(out / "_skipped.jsonl", "w") as f:
        for s in skipped:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    report["skipped"] = len(skipped)
    report["skip_reasons"] = dict(Counter(_reason_kind(s["reason"]) for s in skipped).most_common())
    report["skipped_rows"] = str(out / "_skipped.jsonl")
    (out / "_report.json").write_text(json.dumps(report, indent=2))
    return report


def _reason_kind(reason: str) -> str:
    """A reason without its row-specific details, for counting (the full reason is in _skipped.jsonl)."""
    return re.sub(r"\d+", "N", reason.split(":")[0])[:80]


def export_trl(source: str, output: str, *, sep: str | None = None, after_error: str = "drop") -> dict:
    """Labelled rows (a label job's output folder, a finished active run's folder, or a labelled pool) -> a TRL
    stepwise-supervision dataset: <output>/train.parquet and <output>/hf/ (Dataset.save_to_disk), columns id,
    prompt, completions, labels. Returns the report (also written to <output>/_report.json)."""
    Dataset = _datasets().Dataset
    src, out = Path(source), Path(output)
    kind = source_kind(src)
    extra: dict = {}
    if kind == "run":
        labelled, extra = from_run(src)
        sep = sep or extra["sep"]
    elif kind == "label_job":
        labelled = from_label_job(src)
    else:
        labelled = from_pool(source)
    sep = sep or DEFAULT_SEP
    rows, skipped = [], []
    for r in labelled:
        try:
            if r.reason:
                raise StepFormatError(r.reason)
            rows.append({"id": r.id, **trl_row(r.question, r.steps, r.first_error_step, sep=sep,
                                               after_error=after_error)})
        except StepFormatError as e:
            skipped.append({"where": r.where, "id": r.id, "reason": str(e)})
    out.mkdir(parents=True, exist_ok=True)
    ds = Dataset(pa.Table.from_pylist(rows, schema=TRL_SCHEMA))
    ds.to_parquet(str(out / "train.parquet"))
    ds.save_to_disk(str(out / "hf"))
    report = {"command": "export-trl", "source": source, "source_kind": kind, "after_error": after_error, "sep": sep,
              "rows": len(rows), "steps": sum(len(r["completions"]) for r in rows),
              "outputs": [str(out / "train.parquet"), str(out / "hf")], **extra}
    return _write_side(out, skipped, report)


def _import(records: Iterator[tuple[str, dict | None, str]], output: str, convert, command: str, source: str) -> dict:
    """Shared import loop: convert(rec) -> (question, steps, labels); rows -> <output>/pool.parquet."""
    out = Path(output)
    rows, skipped, notes, first_at = [], [], Counter(), {}
    prefix = Path(source).stem or "row"
    for j, (where, rec, error) in enumerate(records):
        rid = _record_id(rec, prefix, j)
        try:
            if error:
                raise StepFormatError(error)
            if rid in first_at:
                raise StepFormatError(f"duplicate id {rid!r} (first at {first_at[rid]})")
            question, steps, labels = convert(rec)
            row, note = pool_row(rid, question, steps, labels)
            first_at[rid] = where
            rows.append(row)
            notes[note] += bool(note)
        except StepFormatError as e:
            skipped.append({"where": where, "id": rid, "reason": str(e)})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=POOL_SCHEMA), out / "pool.parquet")
    report = {"command": command, "source": source, "rows": len(rows),
              "all_correct": sum(r["first_error_step"] == -1 for r in rows),
              NOT_FIRST_ERROR_SHAPE: notes[NOT_FIRST_ERROR_SHAPE], "outputs": [str(out / "pool.parquet")]}
    return _write_side(out, skipped, report)


def import_trl(source: str, output: str, *, split: str | None = None) -> dict:
    """A TRL stepwise-supervision dataset (prompt, completions, labels; optional id) -> <output>/pool.parquet."""
    def convert(rec):
        values, missing = _fields(rec, ("prompt", "completions", "labels"))
        if missing:
            raise StepFormatError(missing)
        return values

    return _import(read_records(source, split=split), output, convert, "import-trl", source)


def import_math_shepherd(source: str, output: str, *, step_tag: str = MATH_SHEPHERD_TAG,
                         split: str | None = None) -> dict:
    """Math-Shepherd rows (input, label with a step tag; optional id) -> <output>/pool.parquet."""
    def convert(rec):
        values, missing = _fields(rec, ("input", "label"))
        if missing:
            raise StepFormatError(missing)
        return parse_math_shepherd(*values, step_tag=step_tag)

    return _import(read_records(source, split=split), output, convert, "import-math-shepherd", source)


# -- CLI --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m actprm_ray.interop", allow_abbrev=False,
                                description="TRL / HF datasets interop (docs/INTEROP.md).")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export-trl", help="labelled rows -> TRL stepwise supervision (train.parquet + hf/)")
    e.add_argument("source", help="a label job output folder, a finished active run folder, or a labelled pool")
    e.add_argument("--output", required=True, help="output folder")
    e.add_argument("--sep", default=None,
                   help=f"separator stripped from the text (default: the run's model.sep, else {DEFAULT_SEP})")
    e.add_argument("--after-error", choices=AFTER_ERROR, default="drop",
                   help="drop: completions end at the first error (METHOD §1); false: keep them, labelled False")
    t = sub.add_parser("import-trl", help="TRL stepwise supervision -> pool.parquet")
    m = sub.add_parser("import-math-shepherd", help="Math-Shepherd input/label -> pool.parquet")
    for q in (t, m):
        q.add_argument("source", help=".parquet/.jsonl file, a folder of .parquet, or a datasets save_to_disk folder")
        q.add_argument("--output", required=True, help="output folder (pool.parquet, _skipped.jsonl, _report.json)")
        q.add_argument("--split", default=None, help="split of a saved DatasetDict")
    m.add_argument("--step-tag", default=MATH_SHEPHERD_TAG, help="the step tag in `input` (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        _datasets().disable_progress_bars()  # the report below says what was written
    except ImportError:
        pass
    try:
        if a.command == "export-trl":
            report = export_trl(a.source, a.output, sep=a.sep, after_error=a.after_error)
        elif a.command == "import-trl":
            report = import_trl(a.source, a.output, split=a.split)
        else:
            report = import_math_shepherd(a.source, a.output, step_tag=a.step_tag, split=a.split)
    except (FileNotFoundError, ImportError, ValueError, KeyError) as err:
        print(f"[interop] error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"[interop] {report['rows']} rows -> {', '.join(report['outputs'])}")
    print(f"[interop] {report['skipped']} skipped -> {report['skipped_rows']}  "
          f"report -> {Path(a.output) / '_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
