"""The Ray Data stages of the loop, as plain callable classes: `Stage(config, ...)` then `stage(batch) -> batch`.

Each is testable by calling it on a dict batch without Ray. Heavy setup (tokenizer, model) happens in
__init__, once per actor. A bad row never raises: it gets `valid=False` and an `invalid_reason`, and flows
on to the trainer, which records its outcome (one stream, so accounting stays 1:1).

Every stage is a `Stage`: it declares the columns it needs and adds, and the base checks both, and the 1:1 row
count, once for all of them (as ray.data.llm's StatefulStageUDF does for its stages).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from safetensors.torch import load_file

from actprm_ray.data.rows import NO_ORACLE, check_pool_row
from actprm_ray.data.step_format import StepFormatError, encode_trajectory
from actprm_ray.label.base import empty_label_columns
from actprm_ray.select import audit_candidates, is_uncertain, pseudo_labels, select_rows, uncertainty_score


class StageContractError(ValueError):
    """A batch or a stage broke the column contract: a needed column is missing, or a stage did not return one
    value of each declared column per input row. A bug or a wrong plan, never a bad row: it fails the run."""


def _obj(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _typed(values, dtype) -> np.ndarray:
    """A numeric list column as an object array of typed arrays. With Python lists, a batch whose lists are
    all empty (e.g. all rows invalid) becomes an untyped block that later stages hand on as pickled objects,
    while other blocks hold tensors, and Ray cannot concatenate the two for the trainer."""
    return _obj([np.asarray(v, dtype=dtype) for v in values])


def arrow_lists(batch: dict) -> dict:
    """Hand list-of-string columns (steps) back as Python lists. Ray Data gives a numpy batch's list<string>
    column as an object array of object arrays, which it cannot convert back to Arrow on the way out: it falls
    back to pickling the column, per block, at every stage after the first (and warns). Lists convert natively.
    ray_env.init_ray turns that fallback into an error, so a column this misses fails loudly."""
    out = dict(batch)
    for name, col in batch.items():
        if isinstance(col, np.ndarray) and col.dtype == object and any(isinstance(v, np.ndarray) and v.dtype == object for v in col):
            out[name] = _obj([v.tolist() if isinstance(v, np.ndarray) else v for v in col])
    return out


def check_columns(batch: dict, needs: tuple[str, ...], stage: str) -> None:
    """Raise StageContractError naming `stage` and every column of `needs` that `batch` lacks."""
    missing = [c for c in needs if c not in batch]
    if missing:
        raise StageContractError(f"{stage}: input batch lacks column(s) {missing} (has {sorted(batch)})")


class Stage:
    """The base of every stage: a subclass declares its column contract and implements `process`.

        needs   input columns it reads; a batch without one raises, naming the stage and the column
        adds    the columns `process(batch)` returns, new or rewritten (they replace the input's), one value per
                input row: a stage maps each row to exactly one row, so every row read ends in one outcome
        drops   input columns it removes once used (e.g. the token ids after scoring)
        keeps   the input columns that pass through; None = all but `drops`

    `__call__` checks the needs, runs process, checks it returned exactly the declared columns with one value
    per input row, and merges them onto the passed-through input. Last it hands list columns over as Arrow can
    hold them (arrow_lists), so no stage has to remember to.
    """

    needs: tuple[str, ...] = ()
    adds: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()
    keeps: tuple[str, ...] | None = None

    def process(self, batch: dict) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement process(batch) -> its `adds` columns")

    def __call__(self, batch: dict) -> dict:
        name = type(self).__name__
        check_columns(batch, self.needs, name)
        rows = len(next(iter(batch.values()), ()))
        added = self.process(batch)
        if set(added) != set(self.adds):
            raise StageContractError(f"{name}: process returned columns {sorted(added)}, but the stage declares "
                                     f"adds {sorted(self.adds)}")
        wrong = {c: len(v) for c, v in added.items() if len(v) != rows}
        if wrong:
            raise StageContractError(f"{name}: {rows} rows in, but {wrong} out: a stage maps each row to one row")
        kept = batch if self.keeps is None else {c: batch[c] for c in self.keeps if c in batch}
        return arrow_lists({**{c: v for c, v in kept.items() if c not in self.drops}, **added})


class CanonicalizeStage(Stage):
    """Pool rows -> canonical question/steps + token ids + read-out positions (METHOD §2), or an invalid reason.

    Reads first_error_step and the reader's `read_error` (data/shards.py) where the batch has them; a read error
    makes its row invalid with the reader's reason. Only its own columns leave it: the raw text stops here."""

    needs = ("id", "question", "steps")
    adds = ("id", "question", "steps", "input_ids", "readout_positions", "valid", "invalid_reason",
            "oracle_first_error_step", "num_steps", "sep_removed")
    keeps = ()

    def __init__(self, tokenizer_dir: str, *, sep: str, system_prompt: str, max_length: int | None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.sep, self.system_prompt, self.max_length = sep, system_prompt, max_length

    def process(self, batch: dict) -> dict:
        oracle, read_errors = batch.get("first_error_step"), batch.get("read_error")
        cols = {c: [] for c in CanonicalizeStage.adds[1:]}  # (a subclass adds more, after these)
        for i in range(len(batch["id"])):
            row = self._encode(batch["question"][i], batch["steps"][i], None if oracle is None else oracle[i],
                               "" if read_errors is None else str(read_errors[i]))
            for values, v in zip(cols.values(), row):
                values.append(v)
        return {"id": np.asarray([str(x) for x in batch["id"]], dtype=object),
                "question": _obj(cols["question"]), "steps": _obj(cols["steps"]),
                "input_ids": _typed(cols["input_ids"], np.int64),
                "readout_positions": _typed(cols["readout_positions"], np.int64),
                "valid": np.asarray(cols["valid"]), "invalid_reason": _obj(cols["invalid_reason"]),
                **{c: np.asarray(cols[c]) for c in ("oracle_first_error_step", "num_steps", "sep_removed")}}

    def _encode(self, question, steps, first_error_step, read_error: str) -> tuple:
        """One row -> its values of CanonicalizeStage.adds[1:] (question .. sep_removed); an invalid row's
        invalid_reason says why."""
        try:
            steps = list(steps) if isinstance(steps, np.ndarray) else steps
            row, k = check_pool_row(question, steps, first_error_step, sep=self.sep, read_error=read_error)
            # The raw text, not row's: canonicalising the question twice is not always a no-op.
            enc = encode_trajectory(self.tokenizer, question, steps, sep=self.sep,
                                    system_prompt=self.system_prompt, max_length=self.max_length)
            if not enc.readout_positions:
                raise StepFormatError(f"no step separator survives truncation to {self.max_length} tokens")
        except (StepFormatError, TypeError, ValueError) as e:
            return "", [], [], [], False, str(e), NO_ORACLE, 0, 0
        # Keep labels consistent with what the model sees: an error beyond the truncation point is invisible.
        k = -1 if k >= len(enc.readout_positions) else k
        # Downstream (labeler, judge) sees exactly the canonical steps the model reads out.
        return (enc.question, enc.steps, enc.input_ids, enc.readout_positions, True, "", k,
                len(enc.readout_positions), row.sep_removed)


class ScoreStage(Stage):
    """EnsemblePRM scoring with versioned weights: polls the coordinator between batches, swaps weights on a new version.

    Adds step_mean, step_std (lists, one per visible step) and model_version to every row (empty for invalid rows).
    """

    needs = ("id", "input_ids", "readout_positions", "valid")
    adds = ("step_mean", "step_std", "model_version")

    def __init__(self, checkpoint_dir: str, *, batch_size: int = 16, coordinator=None, device: str | None = None,
                 dtype: str = "float32", pack_tokens: int = 0, attn_implementation: str | None = None):
        from actprm_ray.model.ensemble_prm import EnsemblePRM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = EnsemblePRM.from_pretrained(checkpoint_dir, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation).to(self.device)
        self.batch_size, self.coordinator, self.version = batch_size, coordinator, 0
        self.pack_tokens = pack_tokens

    def _refresh_weights(self) -> None:
        if self.coordinator is None:
            return
        import ray

        version, path = ray.get(self.coordinator.latest.remote())
        if version > self.version and path:
            self.model.load_published_state(load_file(path, device=str(self.device)))
            self.version = version

    def process(self, batch: dict) -> dict:
        from actprm_ray.model.scoring import score_encoded

        start = time.perf_counter()
        self._refresh_weights()
        n = len(batch["id"])
        valid = [i for i in range(n) if bool(batch["valid"][i])]
        scores = score_encoded(
            self.model,
            [{"input_ids": batch["input_ids"][i], "readout_positions": batch["readout_positions"][i]} for i in valid],
            batch_size=self.batch_size, device=self.device, pack_tokens=self.pack_tokens)
        means, stds = [[] for _ in range(n)], [[] for _ in range(n)]
        for i, s in zip(valid, scores):
            means[i], stds[i] = s["step_mean"], s["step_std"]
        if self.coordinator is not None:
            self.coordinator.add.remote({"scored": len(valid), "score_out": n,
                                         "score_busy_s": time.perf_counter() - start})
        return {"step_mean": _typed(means, np.float64), "step_std": _typed(stds, np.float64),
                "model_version": np.full(n, self.version, dtype=np.int64)}


class SelectStage(Stage):
    """The selection rule of METHOD §4 per row (mode active | all | random | none). Invalid rows are never selected.

    In mode active two additions, both off by default: `audit_rate` labels that share of trusted rows anyway
    (column `audit`), for an unbiased estimate of pseudo-label accuracy with the real judge; a `controller`
    (select.RateController, or CoordinatorController for the streaming loop's shared one) replaces the fixed
    thresholds by a scale it moves to hold a target label rate."""

    needs = ("id", "valid", "step_mean", "step_std")
    adds = ("uncertain", "selected", "audit")

    def __init__(self, *, mode: str, delta_pred: float, delta_std: float, step_threshold: float, random_rate: float,
                 seed: int, audit_rate: float = 0.0, controller=None):
        self.mode, self.random_rate, self.seed, self.audit_rate = mode, random_rate, seed, audit_rate
        self.controller = controller if mode == "active" else None
        self.thresholds = dict(delta_pred=delta_pred, delta_std=delta_std, step_threshold=step_threshold)

    def process(self, batch: dict) -> dict:
        n = len(batch["id"])
        ids = [str(x) for x in batch["id"]]
        valid = np.asarray(batch["valid"], dtype=bool)
        rows = np.flatnonzero(valid)
        means = [list(batch["step_mean"][i]) for i in rows]
        stds = [list(batch["step_std"][i]) for i in rows]
        candidates = audit_candidates([ids[i] for i in rows], self.audit_rate if self.mode == "active" else 0.0,
                                      self.seed)
        uncertain, audit = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        if self.controller is not None:
            scores = [uncertainty_score(m, s, **self.thresholds) for m, s in zip(means, stds)]
            chosen, audited = self.controller.decide(scores, candidates)
            uncertain[rows] = np.asarray(chosen, dtype=bool) & ~np.asarray(audited, dtype=bool)
            audit[rows] = audited
        else:
            uncertain[rows] = [is_uncertain(m, s, **self.thresholds) for m, s in zip(means, stds)]
            audit[rows] = ~uncertain[rows] & candidates
        selected = (select_rows(self.mode, uncertain, ids, random_rate=self.random_rate, seed=self.seed)
                    | audit) & valid
        return {"uncertain": uncertain, "selected": selected, "audit": audit}


class LabelStage(Stage):
    """Wraps a labeler (oracle | vllm | http) so it shares the run's budget through the coordinator.

    Every labeler returns the label columns of label/base.py's empty_label_columns; the oracle also reads
    oracle_first_error_step (which CanonicalizeStage and the label job's PrepareRowsStage always add)."""

    needs = ("id", "question", "steps", "selected")
    adds = tuple(empty_label_columns(0))

    def __init__(self, labeler_cls, labeler_config, *, coordinator=None, **kwargs):
        from actprm_ray.pipeline.coordinator import CoordinatorBudget

        self.coordinator = coordinator
        budget = CoordinatorBudget(coordinator) if coordinator is not None else None
        self.labeler = labeler_cls(labeler_config, budget=budget, **kwargs)

    def process(self, batch: dict) -> dict:
        start = time.perf_counter()
        labelled = self.labeler(batch)
        out = {c: labelled[c] for c in self.adds}
        out["hard_labels"] = _typed(out["hard_labels"], np.int64)  # every labeler's lists, typed (see _typed)
        if self.coordinator is not None:
            ok = int(sum(1 for s in out["label_status"] if s == "ok"))
            self.coordinator.add.remote({"selected": int(np.sum(batch["selected"])), "labelled": ok,
                                         "label_busy_s": time.perf_counter() - start})
            audits = audit_results({**batch, **out})
            if audits:
                self.coordinator.record_audits.remote(audits)
        return out


def audit_results(batch: dict) -> list[bool]:
    """Per audited row with a judge label: did the ensemble's pseudo-label match it exactly? (the audit's sample)"""
    if "audit" not in batch:
        return []
    return [pseudo_labels(list(batch["step_mean"][i])) == [int(y) for y in batch["hard_labels"][i]]
            for i in range(len(batch["id"])) if bool(batch["audit"][i]) and batch["label_status"][i] == "ok"]
