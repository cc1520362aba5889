"""The online active-learning run: build the plan, stream it into the TorchTrainer, write outcomes + summary."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

from actprm_ray.config import Config, run_directory, to_dict
from actprm_ray.data.shards import index_pool, read_pool_rows, resolve_pool
from actprm_ray.pipeline import outcomes as oc
from actprm_ray.pipeline.plan import build_active_plan
from actprm_ray.drivers.run import Run
from actprm_ray.drivers.run_report import write_run_report
from actprm_ray.select import wilson_interval
from actprm_ray.tracking import log_summary

# Paper cost model (METHOD §7): C ≈ 1,920 generated judge tokens per critique.
TOKENS_PER_CRITIQUE = 1920


def prepare_initial_model(cfg: Config, run_dir: Path) -> Path:
    """Fresh heads on the configured backbone, saved once as the run's version-0 checkpoint."""
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig
    from actprm_ray.model.tiny import build_tiny_backbone

    init_dir = run_dir / "init"
    if (init_dir / "config.json").exists():
        return init_dir
    m = cfg.model
    backbone = m.backbone
    if backbone == "tiny-math":
        # Pretrained once into the models cache (jobs/pretrain.py's defaults), then reused by every run.
        from actprm_ray.model.pretrain import PretrainConfig, backbone_dir, is_built, pretrain_backbone

        pretrain = PretrainConfig(sep=m.sep, system_prompt=m.system_prompt)
        if not is_built(pretrain):
            print(f"[actprm] first use of model.backbone=tiny-math: pretraining it (~6-9 min on 2 cores, once; "
                  f"cached in {backbone_dir(pretrain)})", flush=True)
        backbone = str(pretrain_backbone(pretrain, report=lambda msg: print(f"[actprm] {msg}", flush=True)))
    elif backbone.startswith("tiny"):
        size = backbone.split(":", 1)[1] if ":" in backbone else "tiny"
        backbone = str(build_tiny_backbone(run_dir / f"backbone_{size}", size=size, seed=cfg.run.seed))
    else:
        # "smollm2-135m" etc.: a real pretrained model converted from a PyPI GGUF into the models cache
        # (model/import_gguf.py, on first use); an HF directory or hub id passes through unchanged.
        from actprm_ray.model.import_gguf import resolve_model

        backbone = resolve_model(backbone)
    import torch

    model = EnsemblePRM.from_backbone(backbone, PRMConfig.from_config(cfg), dtype=getattr(torch, m.dtype),
                                      trust_remote_code=m.trust_remote_code)
    return model.save_pretrained(init_dir)


class StatusPrinter(threading.Thread):
    """One line every few seconds: rows scored, selected, labelled, trained, version, labels/s."""

    def __init__(self, coordinator, every_s: float):
        super().__init__(daemon=True)
        self.coordinator, self.every_s, self.stop = coordinator, every_s, threading.Event()

    def run(self) -> None:
        import ray

        while not self.stop.wait(self.every_s):
            try:
                s = ray.get(self.coordinator.snapshot.remote(), timeout=5)
            except Exception:  # noqa: BLE001 -- a status line must never kill the run
                continue
            rate = s.get("labelled", 0) / max(s["elapsed_s"], 1e-9)
            print(f"[actprm] {s['elapsed_s']:6.0f}s scored={int(s.get('scored', 0))} selected={int(s.get('selected', 0))} "
                  f"labelled={int(s.get('labelled', 0))} consumed={s['budget']['consumed']} "
                  f"steps={int(s.get('trained_steps', 0))} version={s['version']} labels/s={rate:.2f}"
                  f"{controller_status(s.get('controller'))}", flush=True)


def controller_status(state: dict | None) -> str:
    if not state:
        return ""
    guard = " GUARDED (audited accuracy below the floor: trusting nothing)" if state["guarded"] else ""
    return (f" rate={state['label_rate']:.3f}/target {state['target_rate']:.3f} scale={state['scale']:.3g} "
            f"audit acc={state['recent_audit_accuracy']:.2f} (n={state['recent_audits']}){guard}")


def run_active(cfg: Config) -> dict:
    import ray

    from actprm_ray.pipeline.coordinator import coordinator_name

    with Run(cfg, run_directory(cfg), tag="actprm") as run:
        run.save_config()
        run.say(f"run dir {run.dir} (config, summary, outcomes, checkpoints)")
        if cfg.selection.inline and cfg.labeler.kind != "oracle":
            raise ValueError("selection.inline=true reveals labels inside the trainer: it needs labeler.kind=oracle")
        run.init_ray()
        cache_path = run.place_label_cache()
        init_dir = prepare_initial_model(cfg, run.dir)
        pool = resolve_pool(cfg, run.dir)
        index = index_pool(pool, limit=cfg.data.limit)  # every row's id up front: the accounting identity needs them
        accounted = run.resume_outcomes()
        # The budget is the run's lifetime budget: the coordinator rebuilds what earlier runs granted from the ledger.
        coordinator = run.start_coordinator(
            coordinator_name(cfg.run.name), str(run.dir), cfg.budget.max_labels, cfg.budget.max_judge_tokens,
            cfg.labeler.judge.max_tokens if cfg.labeler.kind != "oracle" else 0, cache_path, controller_config(cfg))
        labels_before = ray.get(coordinator.budget_state.remote())["labels"]
        plan = build_active_plan(cfg, init_dir=str(init_dir), coordinator_name=run.coordinator_name,
                                 accounted=accounted, source=pool)
        run.say(f"plan:\n{plan.describe()}")
        dataset = plan.apply(read_pool_rows(index, num_cpus=cfg.pipeline.map_num_cpus,
                                            max_retries=cfg.pipeline.map_max_retries))
        status = StatusPrinter(coordinator, cfg.pipeline.status_every_s)
        status.start()
        try:
            result = run.train(dataset)
        finally:
            status.stop.set()
        snapshot = run.stop_coordinator()
        run.compact_ledger(cache_path)  # no labeler is left: fold this run's one-file-per-response parts
        table, counts = run.finalize_outcomes(index.ids)
        summary = run.write_summary(summarize(cfg, run.dir, table, counts, snapshot, result, run.wall_s,
                                              labels_before))
        log_summary(cfg, summary)  # tracking on: summary.json's figures and the file to TensorBoard / MLflow
        summary["report"] = str(write_run_report(run.dir))
        return summary


def controller_config(cfg: Config) -> dict | None:
    s = cfg.selection
    if s.target_rate is None or s.mode != "active":
        return None
    return dict(target_rate=s.target_rate, window=s.controller_window, accuracy_floor=s.accuracy_floor,
                min_audits=s.min_audits)


def audit_summary(rows: list[dict], controller: dict | None) -> dict:
    """Audited trust: pseudo-label accuracy on audited rows against the judge (what a user sees with a real judge),
    with its Wilson interval, beside the same rows against the pool's label when it has one (the check)."""
    audited = [r for r in rows if r["audited"]]
    judged = [r["audit_correct"] for r in audited if r["audit_correct"] >= 0]
    oracle = [r["pseudo_label_correct"] for r in audited if r["pseudo_label_correct"] >= 0]
    low, high = wilson_interval(sum(judged), len(judged))
    return {"audited_rows": len(audited), "audits_judged": len(judged),
            "accuracy_vs_judge": sum(judged) / len(judged) if judged else None,
            "accuracy_vs_judge_95": [low, high] if judged else None,
            "accuracy_vs_oracle": sum(oracle) / len(oracle) if oracle else None,
            "controller": controller}


def summarize(cfg, run_dir, table, counts, snapshot, result, wall_s, labels_before) -> dict:
    from actprm_ray.pipeline.coordinator import judge_counters

    rows = table.to_pylist()
    lags: Counter = Counter()
    trainer = {"redelivered": 0, "over_budget": 0, "transient": 0, "empty_steps": 0, "busy_s": 0.0,
               "rows_trained_here": 0}
    phases: Counter = Counter()
    for f in sorted((run_dir / "trainer").glob("rank*.json")):
        stats = json.loads(f.read_text())
        lags.update({int(k): v for k, v in stats["lags"].items()})
        for k in trainer:
            trainer[k] += stats.get(k, 0)
        phases.update(stats.get("phase_s", {}))
    trainer["phase_s"] = dict(phases)  # summed over ranks: waiting on the stream, publishing, reports, checkpoints
    confident = [r for r in rows if r["outcome"] == oc.CONFIDENT]
    judged = [r for r in confident if r["pseudo_label_correct"] >= 0]
    scored = counts[oc.CONFIDENT] + counts[oc.TRAINED] + counts[oc.LABEL_FAILED]
    labels_used = counts[oc.TRAINED] + counts[oc.LABEL_FAILED]
    budget = snapshot["budget"]
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    busy = {k[: -len("_busy_s")]: snapshot.get(k, 0.0) for k in ("score_busy_s", "label_busy_s")}
    return {
        "run_dir": str(run_dir),
        "rows_read": len(rows),
        "outcomes": counts,
        "identity_holds": sum(counts.values()) == len(rows),
        "labels_used": labels_used,
        "labels_used_before_resume": labels_before,
        "label_rate": labels_used / max(1, len(rows)),
        # Granted = labels used over the run's lifetime (cache hits included), from the ledger; max_labels caps it.
        "budget": {"max_labels": cfg.budget.max_labels, "max_judge_tokens": cfg.budget.max_judge_tokens,
                   "granted": budget["labels"], "granted_from_cache": budget["cached"],
                   "granted_this_run": budget["labels"] - labels_before,
                   "judge_transient_failures": trainer["transient"], "judge_prompt_tokens": budget["prompt_tokens"],
                   "judge_generated_tokens": budget["generated_tokens"],
                   "cache_hits": sum(1 for r in rows if r["label_cache_hit"]),
                   "paper_cost_model_tokens": labels_used * TOKENS_PER_CRITIQUE},
        "judge": judge_counters(snapshot),  # judge requests, re-samples, HTTP posts/retries/errors by kind
        "trust_pct": 100.0 * counts[oc.CONFIDENT] / max(1, scored),
        "pseudo_label_accuracy": (sum(r["pseudo_label_correct"] for r in judged) / len(judged)) if judged else None,
        "audit": audit_summary(rows, snapshot.get("controller")),
        "model_versions_published": snapshot["version"],
        "lag_histogram": {str(k): v for k, v in sorted(lags.items())},
        "trainer": trainer | {"optimizer_steps": int(snapshot.get("trained_steps", 0))},
        "wall_time_s": wall_s,
        "stage_busy_s": busy,
        "stage_rows_per_s": {"score": snapshot.get("scored", 0) / max(busy["score"], 1e-9),
                             "label": snapshot.get("labelled", 0) / max(busy["label"], 1e-9) if busy["label"] else None,
                             # rows per second of one worker's compute (waits for data excluded); x workers for the group
                             "train": trainer["rows_trained_here"] / max(trainer["busy_s"], 1e-9),
                             "end_to_end": len(rows) / max(wall_s, 1e-9)},
        "checkpoint": None if checkpoint is None else str(Path(checkpoint) / "model"),
        "metrics_log": str(run_dir / "metrics.jsonl"),
        "config": to_dict(cfg),
    }
