"""train_loop_per_worker: setup -> consume the labelled stream -> save. Runs inside Ray Train workers (DDP).

Every row the worker pulls off its shard gets exactly one outcome here: trainable rows (label ok) are
trained, every other row is recorded as invalid_input / confident / label_failed / not_reached. Outcomes
are flushed to the run's outcomes/ folder together with each checkpoint, so a restored worker group knows
which rows are already accounted for and skips their re-delivery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from actprm_ray.config import Config
from actprm_ray.model.ensemble_prm import EnsemblePRM
from actprm_ray.pipeline import outcomes as oc
from actprm_ray.select import pseudo_labels
from actprm_ray.train import sharding
from actprm_ray.train.replay import ReplayBuffer, replay_row
from actprm_ray.train.step import build_optimizer, inline_labels, micro_step, optimizer_step

log = logging.getLogger(__name__)


class Worker:
    """One Ray Train worker: model, optimiser, outcome log and counters, and what it sends out (published weights,
    reports, checkpoints). TrainRows feeds it; train_loop_per_worker is the loop between the two."""

    def __init__(self, cfg: Config, run_dir: Path, coordinator_name: str):
        import ray
        import ray.train
        import ray.train.torch

        self.cfg, self.run_dir = cfg, run_dir
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.coordinator = ray.get_actor(coordinator_name, namespace="actprm")
        self.device = ray.train.torch.get_device()
        dtype = getattr(torch, cfg.model.dtype)
        attn = cfg.model.attn_implementation

        self.state = {"step": 0, "version": 0, "rows_trained": 0, "empty_steps": 0, "flushes": 0, "replayed": 0}
        # What train.replay draws from; saved with each checkpoint, so a restored group replays what it would have.
        capacity, seed = cfg.train.replay_buffer_rows, cfg.run.seed
        self.replay = ReplayBuffer(capacity, seed, self.rank)
        checkpoint = ray.train.get_checkpoint()
        self.restored = checkpoint is not None
        optim_state = None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                self.model = self._load_model(Path(d) / "model", dtype, attn)
                self.state = {**self.state, **json.loads((Path(d) / "trainer_state.json").read_text())}
                optim_path = Path(d) / f"optim_rank{self.rank}.pt"
                if optim_path.exists():
                    optim_state = torch.load(optim_path, weights_only=True)  # tensors only, no pickle code
                self.replay = ReplayBuffer.load(Path(d) / f"replay_rank{self.rank}.parquet", capacity, seed, self.rank)
        else:
            self.model = self._load_model(run_dir / "init", dtype, attn)
        self.core: EnsemblePRM = self.model.module if hasattr(self.model, "module") else self.model
        self.optimizer, self.scheduler = build_optimizer(self.model, self.core, cfg.train)
        self.grad_norm = float("nan")
        if optim_state is not None:
            sharding.load_local_optimizer_state(self.optimizer, optim_state["optimizer"])
            self.scheduler.load_state_dict(optim_state["scheduler"])
        # Outcomes flushed with a checkpoint that did not commit (a mid-run group restart from an earlier one):
        # those rows are not in these weights, so they are trained again. Rank 0 moves them; the rest wait.
        if self.rank == 0:
            oc.quarantine_uncommitted(run_dir / "outcomes", self.state["flushes"])
        if self.world > 1:
            dist.barrier()
        self.accounted = set(oc.read_outcome_parts(run_dir / "outcomes").column("id").to_pylist())
        self.pending: list[dict] = []  # outcomes since the last flush
        self.lags: Counter = Counter()
        self.step_lags: list[int] = []  # lags of this optimizer step's rows (its micro-batches): "lag_mean" per step
        self.redelivered = 0
        self.over_budget = 0
        self.transient = 0
        self.last_loss = float("nan")
        self.busy_s = 0.0  # wall time in forward/backward/optimizer: the trainer's own throughput, without waits
        # Where the rest of the wall time goes (B5): waiting on the stream, publishing weights, reports, checkpoints.
        self.phase_s: Counter = Counter({"wait": 0.0, "publish": 0.0, "report": 0.0, "checkpoint": 0.0})
        self.rows_at_start = self.state["rows_trained"]  # busy_s restarts with the process; so does its row count
        self.history: list[dict] = []  # per-step metrics since the last ray.train.report, which carries them all

    def _load_model(self, directory: Path, dtype: torch.dtype, attn: str | None) -> torch.nn.Module:
        """The model of a checkpoint directory, wrapped for the parallel strategy."""
        import ray.train.torch

        cfg = self.cfg
        if cfg.train.parallel_strategy == "fsdp":
            # Ray Train's prepare_model(parallel_strategy="fsdp") is FSDP1 and GPU-only; FSDP2 runs on gloo too.
            return sharding.load_sharded(directory, self.device, dtype=dtype, attn_implementation=attn,
                                         gradient_checkpointing=cfg.model.gradient_checkpointing)
        model = EnsemblePRM.from_pretrained(directory, dtype=dtype, attn_implementation=attn)
        if cfg.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return ray.train.torch.prepare_model(model, parallel_strategy=cfg.train.parallel_strategy)

    @contextlib.contextmanager
    def timed(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[phase] += time.perf_counter() - started

    def rows_here(self) -> int:
        return self.state["rows_trained"] - self.rows_at_start

    # -- weights out: publish, report, checkpoint ---------------------------------------------------------------
    def sync_version(self) -> None:
        """Scorers must get this group's weights under a version above anything published before: after a restore
        (driver rerun, mid-run group restart) or a fresh start over a lost attempt's weights (its checkpoint never
        committed), the coordinator's latest can be ahead of our state. Rank 0's view is broadcast so ranks agree."""
        import ray

        latest = ray.get(self.coordinator.latest.remote())[0] if self.rank == 0 else 0
        version = torch.tensor([max(latest, self.state["version"])], dtype=torch.long)
        if self.world > 1:
            dist.broadcast(version, src=0)
        if self.restored or int(version.item()) > self.state["version"]:
            self.state["version"] = int(version.item())
            self.publish()

    def publish(self) -> None:
        import ray
        from safetensors.torch import save_file

        self.state["version"] += 1
        state = sharding.gather_state(self.model, self.core, self.cfg.train.publish)  # sharded: a collective
        if self.rank == 0:
            weights = self.run_dir / "weights"
            path = weights / f"v{self.state['version']:06d}.safetensors"
            weights.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path))
            ray.get(self.coordinator.publish.remote(self.state["version"], str(path)))
            # Scorers poll often; keep a short tail for in-flight loads.
            (weights / f"v{self.state['version'] - 3:06d}.safetensors").unlink(missing_ok=True)

    def metrics(self, final: bool = False) -> dict:
        s = self.state
        return {"step": s["step"], "version": s["version"], "loss": self.last_loss,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": self.grad_norm, "rows_trained": s["rows_trained"],
                "train_rows_per_s": self.rows_here() / max(self.busy_s, 1e-9),
                # this worker's rows in this step: trainer version minus the version that scored them (None: none)
                "lag_mean": sum(self.step_lags) / len(self.step_lags) if self.step_lags else None, "final": final}

    def report(self, final: bool = False, checkpoint=None) -> None:
        """One report carries every step since the last (MetricsLog writes a line per step): a report waits for the
        Train controller's poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so one per step would cost more than the
        step (B5 measured 65 s of a 108 s run in per-5-step reports)."""
        import ray.train

        history, self.history = self.history, []
        with self.timed("report") if checkpoint is None else contextlib.nullcontext():  # else: checkpoint's time
            ray.train.report({**self.metrics(final), "history": history}, checkpoint=checkpoint)

    def checkpoint(self, final: bool = False) -> None:
        from ray.train import Checkpoint

        self.flush()
        with self.timed("checkpoint"), tempfile.TemporaryDirectory() as tmp:
            state = sharding.gather_state(self.model, self.core, "full")  # sharded: a collective, so on every rank
            if self.rank == 0:
                self.core.save_pretrained(Path(tmp) / "model", state_dict=state)
                (Path(tmp) / "trainer_state.json").write_text(json.dumps(self.state))
            # Each rank's own optimizer state (its shard under FSDP), restored by the same rank on resume.
            torch.save({"optimizer": sharding.local_optimizer_state(self.optimizer),
                        "scheduler": self.scheduler.state_dict()}, Path(tmp) / f"optim_rank{self.rank}.pt")
            if self.cfg.train.replay:
                self.replay.save(Path(tmp) / f"replay_rank{self.rank}.parquet")
            self.report(final, checkpoint=Checkpoint.from_directory(tmp))

    def after_optimizer_step(self) -> None:
        """Count the step, then publish, checkpoint and report on their cadences. Every rank reaches each of them at
        the same step (the micro-batches run in lockstep), as the collectives and ray.train.report require."""
        t = self.cfg.train
        self.state["step"] += 1
        self.history.append(self.metrics())
        self.step_lags = []
        if t.step_delay_s:
            time.sleep(t.step_delay_s)
        if self.state["step"] % t.publish_every == 0:
            with self.timed("publish"):
                self.publish()
        if self.state["step"] % t.checkpoint_every == 0:
            self.checkpoint()
        elif t.report_every and self.state["step"] % t.report_every == 0:
            self.report()
        if self.rank == 0:
            self.coordinator.add.remote({"trained_steps": 1})

    def write_stats(self) -> None:
        """This worker's counters for the driver's summary (trainer/rank<r>.json)."""
        stats = {"lags": {str(k): v for k, v in sorted(self.lags.items())}, "redelivered": self.redelivered,
                 "over_budget": self.over_budget, "transient": self.transient,
                 "busy_s": self.busy_s, "phase_s": dict(self.phase_s), "rows_trained_here": self.rows_here(),
                 "empty_steps": self.state["empty_steps"]}
        (self.run_dir / "trainer").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "trainer" / f"rank{self.rank}.json").write_text(json.dumps(stats))

    # -- outcomes ----------------------------------------------------------------------------------------------
    def record(self, row: dict, outcome: str, reason: str = "", **extra) -> None:
        if bool(row.get("audit", False)) and outcome != oc.INVALID_INPUT:
            extra.update(audit_fields(row, outcome))
        self.pending.append(oc.outcome_row(
            row["id"], outcome, reason, model_version=row.get("model_version", -1), train_version=self.state["version"],
            label_source=str(row.get("label_source", "")), label_cache_hit=bool(row.get("label_cache_hit", False)),
            judge_prompt_tokens=int(row.get("judge_prompt_tokens", 0)), judge_tokens=int(row.get("judge_tokens", 0)),
            label_key=str(row.get("label_key", "")), **extra))
        self.accounted.add(row["id"])

    def triage(self, row: dict) -> bool:
        """Record the outcome of a row that will not be trained; return True if the row should be trained."""
        if row["id"] in self.accounted:  # re-delivered after a restore: already has its outcome
            self.redelivered += 1
            return False
        if not row["valid"]:
            self.record(row, oc.INVALID_INPUT, str(row["invalid_reason"]))
            return False
        if self.cfg.selection.inline:
            return True  # selection happens in the forward pass (Algorithm 1)
        status = row["label_status"]
        if status == "skipped":
            self.record(row, oc.CONFIDENT, "trusted by the ensemble", pseudo_label_correct=oracle_agrees(row))
            return False
        if status in ("over_budget", "transient"):
            # Not a final outcome: a rerun (a larger budget, the judge back up) must label it, so it is not
            # flushed; the driver marks it not_reached at the end of this run.
            self.over_budget += status == "over_budget"
            self.transient += status == "transient"
            return False
        if status != "ok":
            self.record(row, oc.LABEL_FAILED, str(row["label_reason"]))
            return False
        return True

    def flush(self) -> None:
        if self.pending:
            name = f"rank{self.rank}-flush{self.state['flushes']:06d}-{time.time_ns()}.parquet"
            oc.write_outcome_part(self.pending, self.run_dir / "outcomes" / name)
            self.pending = []
        self.state["flushes"] += 1

    # -- one optimizer micro-step ------------------------------------------------------------------------------
    def step(self, rows: list[dict]) -> None:
        """One micro-batch (train/step.py), then one outcome per real row."""
        result = micro_step(self.model, self.core, rows, self.cfg, self.device, loss_scale=1 / self.cfg.train.grad_accum)
        self.last_loss = result.loss
        self.state["empty_steps"] += int(result.empty_selection)
        for r, selected, pseudo_correct in zip(rows, result.selected, result.pseudo_label_correct):
            if r.get("_dummy"):
                continue
            lag = self.state["version"] - int(r.get("model_version", self.state["version"]))
            self.lags[lag] += 1
            self.step_lags.append(lag)
            if selected:
                self.record(r, oc.TRAINED)
                self.state["rows_trained"] += 1
                if self.cfg.train.replay:
                    self.replay.add(replay_row(r, self.cfg.selection.inline))
            else:
                self.record(r, oc.CONFIDENT, "trusted by the ensemble (inline selection)",
                            pseudo_label_correct=pseudo_correct)


    def replay_step(self) -> None:
        """One micro-batch drawn from the replay buffer (train/replay.py); no outcomes, the rows have theirs. A rank
        with none yet joins with a dummy row, so every rank runs the same micro-steps."""
        rows = self.replay.draw(self.cfg.train.micro_batch_size, self.state["replayed"]) or [_dummy_row(self.core)]
        self.state["replayed"] += 1
        micro_step(self.model, self.core, rows, self.cfg, self.device, loss_scale=1 / self.cfg.train.grad_accum,
                   replayed=True)


def oracle_agrees(row: dict) -> int:
    """A scored row's pseudo-label against the pool's own label: 1/0, or -1 when the pool has none."""
    k, mean = int(row.get("oracle_first_error_step", -2)), list(row["step_mean"])
    return -1 if k == -2 else int(pseudo_labels(mean) == inline_labels(k, len(mean)))


def audit_fields(row: dict, outcome: str) -> dict:
    """An audited row was trusted, then labelled anyway: its pseudo-label against the judge (the audit) and the
    pool's label (to check the audit), so audited and oracle pseudo-label accuracy sit side by side."""
    judged = outcome == oc.TRAINED
    agree = int(pseudo_labels(list(row["step_mean"])) == [int(y) for y in row["hard_labels"]]) if judged else -1
    return {"audited": True, "audit_correct": agree, "pseudo_label_correct": oracle_agrees(row)}


# Label statuses of rows the budget granted: the stop rule waits for every one of them to reach the trainer.
GRANTED_STATUSES = ("ok", "failed", "transient")


def _dummy_row(core: EnsemblePRM) -> dict:
    sep = core.tokenizer.convert_tokens_to_ids(core.config.sep)
    return {"id": "", "input_ids": [sep], "readout_positions": [0], "hard_labels": [1],
            "oracle_first_error_step": -1, "_dummy": True}


def _rows(batch: dict) -> list[dict]:
    n = len(batch["id"])
    return [{k: batch[k][i] for k in batch} for i in range(n)]


class TrainRows:
    """This worker's shard of the labelled stream, as micro-batches of trainable rows. Every other row's outcome
    is recorded on the way (Worker.triage), the labels the budget granted are reported consumed, and with a
    budget the stream stops once every granted label has arrived."""

    def __init__(self, w: Worker, shard):
        self.w, self.size = w, w.cfg.train.micro_batch_size
        self.stream = iter(shard.iter_batches(batch_size=self.size, batch_format="numpy", prefetch_batches=1))
        self.buffer: list[dict] = []
        self.stream_done = self.budget_done = False
        self.budgeted = w.cfg.budget.max_labels is not None or w.cfg.budget.max_judge_tokens is not None
        self.last_rows: list[dict] = []

    def pull(self) -> None:
        import ray

        w = self.w
        try:
            with w.timed("wait"):
                batch = next(self.stream)
        except StopIteration:
            self.stream_done = True
            return
        w.coordinator.add.remote({"pulled": len(batch["id"])})
        granted_keys = []  # every row the budget granted reaches here, whatever its label's fate
        for row in _rows(batch):
            if w.triage(row):
                self.buffer.append(row)
            if row.get("label_status") in GRANTED_STATUSES and row.get("label_key"):
                granted_keys.append(str(row["label_key"]))
        if granted_keys:
            w.coordinator.consume.remote(granted_keys)
        if self.budgeted:
            self.budget_done = ray.get(w.coordinator.all_granted_consumed.remote())

    def next_micro_batch(self) -> list[dict] | None:
        """The next micro-batch, or None once every rank is out of rows. Join semantics for uneven shards: every
        rank steps while any rank has data; an empty rank runs a zero-weight dummy batch so DDP's all-reduce still
        matches (METHOD §5: 0·Σz keeps the graph connected)."""
        while len(self.buffer) < self.size and not self.stream_done and not self.budget_done:
            self.pull()
        rows, self.buffer = self.buffer[: self.size], self.buffer[self.size:]
        have = torch.tensor([1 if rows else 0], dtype=torch.long)
        if self.w.world > 1:
            dist.all_reduce(have, op=dist.ReduceOp.MAX)
        if int(have.item()) == 0:
            return None
        if rows:
            self.last_rows = rows
            return rows
        # A rank that never got a trainable row still joins, with a one-token dummy row (zero weight).
        return [{**self.last_rows[0], "_dummy": True}] if self.last_rows else [_dummy_row(self.w.core)]


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train.v2._internal.execution import context as train_context

    # Train logs every report's metrics at INFO, in one line: with the per-step history a report carries, that
    # is a 10 KB log line per report, all of it in metrics.jsonl already. (Its logger is named by file path.)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    cfg = _from_dict(loop_config["config"])
    t = cfg.train
    w = Worker(cfg, Path(loop_config["run_dir"]), loop_config["coordinator_name"])
    rows_in = TrainRows(w, ray.train.get_dataset_shard("train"))
    w.sync_version()
    micro = 0
    while (rows := rows_in.next_micro_batch()) is not None:
        # The new rows, then train.replay micro-batches of rows already trained: the same count on every rank.
        for replayed in [False] + [True] * t.replay:
            started = time.perf_counter()
            if replayed:
                w.replay_step()
            else:
                w.step(rows)
            micro += 1
            boundary = micro % t.grad_accum == 0
            if boundary:
                w.grad_norm = optimizer_step(w.model, w.optimizer, w.scheduler, t.grad_clip)
            w.busy_s += time.perf_counter() - started
            if boundary:
                w.after_optimizer_step()
    # Rows already pulled but not trained (budget stop) stay without outcome: the driver marks them not_reached.
    w.write_stats()
    w.checkpoint(final=True)


def _from_dict(d: dict) -> Config:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
