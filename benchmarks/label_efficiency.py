"""Label efficiency through the streaming loop (issue 17, METHOD §10): active vs random vs full data vs inline, on CPU.

    python benchmarks/label_efficiency.py            # the headline: 10,000 rows x 5 seeds x 4 arms, replay 2 (hours; resumable)
    python benchmarks/label_efficiency.py --report-only   # the outputs from the recorded runs (+ backbone build if missing)
    python benchmarks/label_efficiency.py --quick    # CI smoke run (<= 5 min): 1 seed, tiny pool, 3 arms
    python benchmarks/label_efficiency.py --replay 0 --report-only   # the recorded sweep without replay

Every arm is one streaming run (`run_active`) over the same synthetic pool with the oracle labeler, in one
local Ray instance. Ray Train keeps only the last 2 checkpoints, so a watcher thread copies every checkpoint's
model dir (and the trainer state, whose `rows_trained` is the number of labels consumed so far) as it appears.
After each run the kept checkpoints are scored on a held-out synthetic test set (a different data seed) with
the ProcessBench protocol: prediction = first step with µ < 0.5, F1 = harmonic mean of acc_err and acc_cor.

Finished runs are also recorded in benchmarks/results/label_efficiency_runs/ (done/eval/summary JSON and the
backbone build's fingerprint, ~10 KB a run) and restored from there on start, so the sweep resumes across
sessions on fresh machines: commit the records with the results.

Outputs (in --out, default benchmarks/results): label_efficiency.json (every evaluated point), label_efficiency.md
(tables, paired differences) and label_efficiency.png (F1 vs labels, mean line per arm, 95% t-interval over seeds
shaded, the zero-label LM-surprise reference as a line).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actprm_ray.eval.curves import f1_at_budget, labels_to_reach, plot_label_efficiency, surprise_reference, t_interval  # noqa: E402

TOKENS_PER_CRITIQUE = 1920  # METHOD §7 cost model, the same constant as actprm_ray.drivers.active


# --- the task ----------------------------------------------------------------------------------------------
def task_mix():
    """The synthetic task every arm trains and is tested on: `MIXES["addsub"]` (documented in docs/RESULTS.md).

    Chosen by offline probes with the random-init tiny backbone, which learns no arithmetic: add/subtract
    stories (2..5 steps, values <= 60), half the rows correct, errors wrong_operator (3) and skipped_step (1).
    """
    from actprm_ray.data.synthetic import MIXES

    return MIXES["addsub"]


# --- plan of the experiment ---------------------------------------------------------------------------------
@dataclass
class Arm:
    name: str
    overrides: list[str] = field(default_factory=list)
    match_rate_of: str = ""  # random arm: take selection.random_rate from this arm's measured label rate


@dataclass
class Plan:
    pool_rows: int
    test_rows: int
    seeds: list[int]
    arms: list[Arm]
    n_heads: int
    budget_fracs: list[float]
    recipe: list[str] = field(default_factory=list)  # config overrides of every run: backbone, learning rates
    micro_batch: int = 8
    replay: int = 0  # train.replay: micro-batches of already-labelled rows after each new one

    @property
    def checkpoint_every(self) -> int:
        """Optimizer steps between checkpoints: one per smallest budget step (labels = steps x micro batch, and
        each new micro-batch brings `replay` replayed ones)."""
        return max(1, round(self.budget_fracs[0] * self.pool_rows / self.micro_batch * (1 + self.replay)))


# The recipe chosen on validation pools (docs/RESULTS.md, "Recipe probes", rounds 1-3): the pretrained tiny
# backbone, backbone lr 3e-4, head lr 3e-3, 20 warm-up steps, then a constant LR (total_steps far beyond any
# run), and two replayed micro-batches per new one (round 3: the only setting that left the plateau on every
# validation pool). The same for every arm, so curves differ only by which rows were labelled.
PRETRAINED_RECIPE = ["train.lr=3e-4", "train.head_lr=3e-3", "train.warmup_steps=20", "train.total_steps=100000"]
PRETRAINED_REPLAY = 2


def make_plan(quick: bool) -> Plan:
    """The arms. `random` is matched to the label rate of the paper-threshold `active` arm of the same seed.

    The full plan is issue 17's headline through the streaming loop: 10,000-row pools, 5 seeds, the pretrained
    backbone and recipe of the pool simulation (benchmarks/pool_sim.py runs the threshold grid and ablations
    through the same step, loss and selection code). `--quick` is CI's structural check: the random-init tiny
    backbone (no pretraining), 320 rows, 1 seed."""
    active = Arm("active", ["selection.mode=active", "selection.delta_pred=0.95", "selection.delta_std=0.005"])
    rand = Arm("random", ["selection.mode=random"], match_rate_of="active")
    full = Arm("all", ["selection.mode=all"])
    if quick:
        return Plan(pool_rows=320, test_rows=100, seeds=[0], arms=[active, rand, full], n_heads=4,
                    budget_fracs=[0.25, 0.5, 0.75, 1.0],
                    recipe=["model.backbone=tiny", "train.lr=3e-3", "train.warmup_steps=10"])
    inline = Arm("active_inline", [*active.overrides, "selection.inline=true"])
    return Plan(pool_rows=10_000, test_rows=300, seeds=[0, 1, 2, 3, 4], arms=[active, rand, full, inline], n_heads=8,
                budget_fracs=[0.05 * i for i in range(1, 21)],
                recipe=[f"model.backbone={pretrained_backbone()}", *PRETRAINED_RECIPE], replay=PRETRAINED_REPLAY)


def pretrained_backbone() -> Path:
    """The tiny-math backbone in the models cache (jobs/pretrain.py's default, shared with `make run`), built on
    first use (~6-9 min on 2 cores)."""
    from actprm_ray.model.pretrain import PretrainConfig, pretrain_backbone

    return pretrain_backbone(PretrainConfig())


def backbone_fingerprint(backbone: Path) -> str:
    """sha256 of the backbone's weights (first 16 hex digits): pretraining is seeded but not bit-reproducible
    across machines and thread counts, so each run record says which build it trained on."""
    import hashlib

    return hashlib.sha256((backbone / "model.safetensors").read_bytes()).hexdigest()[:16]


# --- run records: the sweep resumes across machines ---------------------------------------------------------
RECORD_FILES = ("done.json", "eval.json", "summary.json")  # all that the report reads of a finished run (~10 KB)


def save_record(run_dir: Path, records: Path, backbone: str | None) -> None:
    """Copy a finished, evaluated run's small files to `records` (benchmarks/results/label_efficiency_runs: kept
    in git), so a later session on a fresh machine reports it without running it again."""
    dest = records / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    if backbone and not (dest / "backbone.txt").is_file():
        (dest / "backbone.txt").write_text(backbone + "\n")


def restore_records(records: Path, work: Path, replay: int) -> list[str]:
    """Put recorded runs missing from `work` back (done.json + eval.json make run_arm and evaluate_run skip them).
    A record of another recipe (train.replay) is not this plan's run: it stays out."""
    restored = []
    for rec in sorted(p for p in records.glob("*_s*") if (p / "done.json").is_file() and (p / "eval.json").is_file()):
        run_dir = work / rec.name
        if (run_dir / "done.json").is_file() or json.loads((rec / "done.json").read_text()).get("replay", 0) != replay:
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a half-finished run of this session: the record is the finished one
        shutil.copytree(rec, run_dir)
        restored.append(rec.name)
    return restored


# --- keeping every checkpoint -------------------------------------------------------------------------------
class CheckpointKeeper(threading.Thread):
    """Copy each new Ray Train checkpoint (model dir + trainer_state.json) before num_to_keep=2 deletes it."""

    def __init__(self, run_dir: Path, keep_dir: Path, poll_s: float = 0.5):
        super().__init__(daemon=True)
        self.run_dir, self.keep_dir, self.poll_s = run_dir, keep_dir, poll_s
        self.stop, self.seen = threading.Event(), set()

    def scan(self) -> None:
        for ck in sorted(self.run_dir.glob("ray_train/*/checkpoint_*")):
            if ck.name in self.seen:
                continue
            state, heads = ck / "trainer_state.json", ck / "model" / "heads.safetensors"
            if not (state.is_file() and heads.is_file() and (ck / "model" / "backbone").is_dir()):
                continue  # still being persisted
            try:
                sizes = _sizes(ck)
                time.sleep(0.2)  # unchanged sizes over a short wait = the copy into storage is complete
                if sizes != _sizes(ck):
                    continue
                st = json.loads(state.read_text())
                dest = self.keep_dir / f"step{int(st['step']):06d}"
                if not dest.exists():
                    shutil.copytree(ck / "model", dest / "model")
                    (dest / "trainer_state.json").write_text(json.dumps(st))
                self.seen.add(ck.name)
            except (OSError, ValueError, KeyError):
                continue  # deleted or half-written under us; the next scan retries or it is gone

    def run(self) -> None:
        while not self.stop.wait(self.poll_s):
            self.scan()


def _sizes(d: Path) -> dict:
    return {str(p): p.stat().st_size for p in d.rglob("*") if p.is_file()}


# --- evaluation ---------------------------------------------------------------------------------------------
def evaluate_checkpoint(model_dir: Path, test_rows: list[dict], tau: float = 0.5) -> dict:
    """ProcessBench first-error metrics of one EnsemblePRM checkpoint on the test rows."""
    import torch

    from actprm_ray.eval.metrics import first_error_metrics, first_error_prediction
    from actprm_ray.model.ensemble_prm import EnsemblePRM
    from actprm_ray.model.scoring import score_trajectories

    model = EnsemblePRM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        scores = score_trajectories(model, model.tokenizer, test_rows, sep=model.config.sep,
                                    system_prompt=model.config.system_prompt, batch_size=32)
    preds = [first_error_prediction(s["step_mean"], tau) for s in scores]
    return first_error_metrics([int(r["first_error_step"]) for r in test_rows], preds)


# --- one run ------------------------------------------------------------------------------------------------
def run_arm(plan: Plan, arm: Arm, seed: int, pool_path: Path, work: Path, extra: list[str]) -> dict:
    from actprm_ray.config import DEFAULT_CONFIG, load_config
    from actprm_ray.drivers.active import run_active

    name = f"{arm.name}_s{seed}"
    run_dir = work / name
    if (run_dir / "done.json").is_file():  # a finished run is reused (rerunning the script resumes the sweep)
        return json.loads((run_dir / "done.json").read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a half-finished run would resume with missing checkpoints: start it over
    steps_all = math.ceil(plan.pool_rows / plan.micro_batch) * (1 + plan.replay)
    overrides = [
        f"run.name={name}", f"run.output_dir={work}", f"run.seed={seed}", f"data.pool={pool_path}",
        f"model.init_seed={seed}", f"model.n_heads={plan.n_heads}", "model.max_length=512",
        # Publish every 4 new micro-batches whatever the replay: the same scorer staleness, in labels, for every arm.
        f"selection.seed={seed}", f"train.publish_every={4 * (1 + plan.replay)}",
        # One LR schedule for every arm (the full-data arm's length; the recipe may override it): at equal labels
        # every arm has seen the same learning rate, so the curves differ only by which rows were labelled.
        f"train.total_steps={steps_all}", *plan.recipe, f"train.micro_batch_size={plan.micro_batch}",
        f"train.replay={plan.replay}", f"train.checkpoint_every={plan.checkpoint_every}", "pipeline.status_every_s=30",
        "pipeline.no_progress_timeout_s=300",
        # Small pools of short rows fit the default 100 MB object-store budget whole: the scorer then scores the
        # entire pool with the version-0 model before the trainer's first step (measured: lag up to 62 versions,
        # every row selected). A tight budget and small blocks keep the scorer within a few hundred rows.
        "pipeline.object_store_limit_mb=2", "pipeline.block_size_kb=32", *arm.overrides, *extra]
    cfg = load_config(DEFAULT_CONFIG, overrides)
    keeper = CheckpointKeeper(run_dir, run_dir / "kept")
    run_dir.mkdir(parents=True, exist_ok=True)
    keeper.start()
    try:
        summary = run_active(cfg)
    finally:
        keeper.stop.set()
        keeper.join()
    keeper.scan()  # the final checkpoint may land after the last poll
    done = {"arm": arm.name, "seed": seed, "labels_used": summary["labels_used"], "label_rate": summary["label_rate"],
            "rows_read": summary["rows_read"], "wall_time_s": summary["wall_time_s"],
            "final_checkpoint": summary["checkpoint"], "random_rate": cfg.selection.random_rate,
            "init_dir": str(run_dir / "init"), "replay": plan.replay}
    (run_dir / "done.json").write_text(json.dumps(done))
    return done


def evaluate_run(run: dict, run_dir: Path, test_rows: list[dict]) -> list[dict]:
    """F1 at labels=0 (the initial model) and at every kept checkpoint."""
    cache = run_dir / "eval.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    points = [{"labels": 0, "step": 0, **evaluate_checkpoint(Path(run["init_dir"]), test_rows)}]
    for d in sorted((run_dir / "kept").glob("step*")):
        st = json.loads((d / "trainer_state.json").read_text())
        m = evaluate_checkpoint(d / "model", test_rows)
        points.append({"labels": int(st["rows_trained"]), "step": int(st["step"]), **m})
    for p in points:
        p["judge_tokens"] = p["labels"] * TOKENS_PER_CRITIQUE
        p.pop("undefined", None)
    cache.write_text(json.dumps(points))
    return points


# --- report -------------------------------------------------------------------------------------------------
def run_stats(run: dict, work: Path) -> dict:
    """What summary.json says about one finished run: trust, pseudo-label accuracy on trusted rows, staleness."""
    from actprm_ray.tracking import lag_stats

    path = work / f"{run['arm']}_s{run['seed']}" / "summary.json"
    s = json.loads(path.read_text()) if path.is_file() else {}
    lag = lag_stats(s.get("lag_histogram") or {}).get("mean", math.nan)  # trained rows' scorer staleness
    return {"trust_pct": s.get("trust_pct", math.nan), "lag_mean": lag,
            "pseudo_label_accuracy": math.nan if s.get("pseudo_label_accuracy") is None else s["pseudo_label_accuracy"]}


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if x is not None and not math.isnan(x)] or [math.nan]


def aggregate(plan: Plan, results: dict, work: Path) -> dict:
    """Per arm: mean F1 [95% t-interval over seeds] at each budget and at the end, label rate, trust; per seed, the
    labels needed to reach the same seed's full-data final F1; paired-by-seed differences (issue 17 (a)-(c))."""
    budgets = [round(f * plan.pool_rows) for f in plan.budget_fracs]
    arms = {}
    for arm, runs in results.items():
        rows = []
        for b in budgets:
            # A run that stopped before this budget (active arms label < 100%) has no point there.
            reached = [f1_at_budget(r["points"], b) for r in runs if r["run"]["labels_used"] >= b]
            rows.append({"labels": b, "frac": b / plan.pool_rows, "f1": t_interval(reached) if reached else None,
                         "n": len(reached)})
        stats = [run_stats(r["run"], work) for r in runs]
        arms[arm] = {"budgets": rows, "final_f1": t_interval([r["points"][-1]["f1"] for r in runs]),
                     "labels_used": t_interval([r["run"]["labels_used"] for r in runs]),
                     "label_rate": t_interval([r["run"]["label_rate"] for r in runs]),
                     "trust_pct": t_interval(_finite([s["trust_pct"] for s in stats])),
                     "pseudo_label_accuracy": t_interval(_finite([s["pseudo_label_accuracy"] for s in stats])),
                     "lag_mean": t_interval(_finite([s["lag_mean"] for s in stats])),
                     "wall_time_s": t_interval([r["run"]["wall_time_s"] for r in runs]),
                     "seeds": [r["run"]["seed"] for r in runs]}
    return {"budgets": budgets, "arms": arms, "headline": headline(plan, results)}


def headline(plan: Plan, results: dict) -> dict:
    """Issue 17's questions, every comparison paired by seed (runs of the same seed share pool and init)."""
    by_seed = {arm: {r["run"]["seed"]: r for r in runs} for arm, runs in results.items()}
    half = round(0.5 * plan.pool_rows)
    head = {}
    if "all" in by_seed:
        for arm, runs in by_seed.items():
            # (a) labels > 0 only: the initial model can score above a weak full-data arm by chance
            head[f"labels_to_full_f1/{arm}"] = {
                seed: labels_to_reach([p for p in r["points"] if p["labels"] > 0],
                                      by_seed["all"][seed]["points"][-1]["f1"])
                for seed, r in runs.items() if seed in by_seed["all"]}

    def paired(a: str, b: str, at) -> dict | None:
        if a not in by_seed or b not in by_seed:
            return None
        diffs = {}
        for seed in sorted(set(by_seed[a]) & set(by_seed[b])):
            ra, rb = by_seed[a][seed], by_seed[b][seed]
            x = at(ra, rb)
            fa, fb = f1_at_budget(ra["points"], x), f1_at_budget(rb["points"], x)
            if fa is not None and fb is not None:
                diffs[seed] = fa - fb
        return {"per_seed": diffs, "mean_ci": t_interval(list(diffs.values()))} if diffs else None

    head["active_minus_random_at_50pct"] = paired("active", "random", lambda a, b: half)  # (b)
    head["active_minus_all_at_50pct"] = paired("active", "all", lambda a, b: half)
    head["active_minus_all_final"] = paired("active", "all", lambda a, b: plan.pool_rows)
    # (c) inline vs streaming at equal labels: at the labels the inline run used in all (it stops labelling early)
    head["inline_minus_streaming_at_inline_labels"] = paired(
        "active_inline", "active", lambda a, b: min(a["run"]["labels_used"], b["run"]["labels_used"]))
    return {k: v for k, v in head.items() if v is not None}


def _cell(v) -> str:
    if v is None:
        return "—"
    m, lo, hi = v
    return "—" if math.isnan(m) else (f"{m:.3f}" if math.isnan(lo) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]")


def write_markdown(plan: Plan, agg: dict, path: Path, reference: dict | None) -> None:
    names = list(agg["arms"])
    lines = ["F1 at a label budget, mean [95% t-interval] over the seeds that reached it:", "",
             "| labels (% of pool) | judge tokens | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for i, b in enumerate(agg["budgets"]):
        cells = [_cell(agg["arms"][n]["budgets"][i]["f1"]) for n in names]
        lines.append(f"| {b} ({100 * b / plan.pool_rows:.0f}%) | {b * TOKENS_PER_CRITIQUE:,} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | label rate | final F1 | trusted % | pseudo-label acc. on trusted rows (oracle) | "
              "mean lag (versions) | wall s / run |", "|---|---|---|---|---|---|---|"]
    for n in names:
        a = agg["arms"][n]
        lines.append(f"| {n} | {_cell(a['label_rate'])} | {_cell(a['final_f1'])} | {_cell(a['trust_pct'])} | "
                     f"{_cell(a['pseudo_label_accuracy'])} | {_cell(a['lag_mean'])} | {a['wall_time_s'][0]:.0f} |")
    if reference:
        lines += ["", f"Zero-label reference (pretrained LM surprise, {reference['detector']}): F1 {reference['f1']:.3f}."]
    lines += ["", "Paired by seed:", ""]
    for k, v in agg["headline"].items():
        if k.startswith("labels_to_full_f1/"):
            per = ", ".join(f"s{s}: {'never' if n is None else f'{100 * n / plan.pool_rows:.0f}%'}" for s, n in v.items())
            lines.append(f"- {k}: {per}")
        else:
            per = ", ".join(f"s{s}: {d:+.3f}" for s, d in v["per_seed"].items())
            lines.append(f"- {k}: {_cell(v['mean_ci'])} ({per})")
    path.write_text("\n".join(lines) + "\n")


def write_plot(plan: Plan, results: dict, path: Path, reference: dict | None) -> None:
    refs = {}
    if "all" in results:
        refs["full-data final F1"] = t_interval([r["points"][-1]["f1"] for r in results["all"]])[0]
    if reference:
        refs["zero-label LM surprise"] = reference["f1"]
    plot_label_efficiency({arm: [r["points"] for r in runs] for arm, runs in results.items()}, path,
                          pool_rows=plan.pool_rows, references=refs,
                          title=f"Label efficiency through the streaming loop ({len(plan.seeds)} seed(s), "
                                f"{plan.pool_rows:,}-row pools; band: 95% t-interval)")


# --- driver -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke size: 1 seed, 320-row pool, 3 arms")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the PNG/MD/JSON go")
    ap.add_argument("--work", default=str(ROOT / "runs" / "label_efficiency"), help="run directories")
    ap.add_argument("--seeds", type=int, nargs="*", help="override the plan's seeds")
    ap.add_argument("--arms", nargs="*", help="only these arms (random needs active)")
    ap.add_argument("--pool-rows", type=int, help="override the pool size")
    ap.add_argument("--replay", type=int, help=f"train.replay of every run (default: the plan's, {PRETRAINED_REPLAY}); "
                    "another value names its outputs and records label_efficiency_replay<k>*")
    ap.add_argument("--records", help="finished runs' small files, restored into --work before and saved after each "
                    "run, so the sweep resumes on a fresh machine (full plan only; '' = off; default: "
                    "benchmarks/results/label_efficiency_runs)")
    ap.add_argument("--report-only", action="store_true",
                    help="start no run: evaluate and report the finished runs in --work (e.g. of a cut-short sweep)")
    ap.add_argument("overrides", nargs="*", help="extra a.b=c config overrides for every run")
    args = ap.parse_args(argv)

    from actprm_ray.data.synthetic import generate_pool, write_pool
    from actprm_ray.pipeline.ray_env import init_ray

    plan = make_plan(args.quick)
    if args.seeds:
        plan.seeds = args.seeds
    if args.pool_rows:
        plan.pool_rows = args.pool_rows
    if args.arms:
        plan.arms = [a for a in plan.arms if a.name in args.arms]
    if args.replay is not None:
        plan.replay = args.replay
    # The headline recipe's outputs are label_efficiency.*; another replay's (e.g. the recorded replay-0 sweep)
    # label_efficiency_replay<k>.*, with its records beside them.
    stem = "label_efficiency" + ("" if args.quick or plan.replay == PRETRAINED_REPLAY else f"_replay{plan.replay}")
    if args.records is None:
        args.records = str(ROOT / "benchmarks" / "results" / f"{stem}_runs")
    work = Path(args.work) / ("quick" if args.quick else f"full_replay{plan.replay}")  # a recipe per folder
    out = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    mix = task_mix()
    test_rows = generate_pool(plan.test_rows, seed=10_000, mix=mix)  # held out: a seed no pool uses
    records = Path(args.records) if args.records and not args.quick else None
    backbone = None if args.quick else backbone_fingerprint(pretrained_backbone())
    if records:
        restored = restore_records(records, work, plan.replay)
        if restored:
            print(f"[label_efficiency] restored {len(restored)} finished run(s) from {records}: {' '.join(restored)}")
        other = sorted(r.parent.name for r in records.glob("*/backbone.txt") if r.read_text().strip() != backbone)
        if other:  # a rebuilt backbone (another machine or thread count) is not bit-identical: say which runs differ
            print(f"[label_efficiency] WARNING: {len(other)} recorded run(s) trained on another backbone build than "
                  f"this machine's {backbone}: {' '.join(other)}", flush=True)
    if not args.report_only:
        init_ray(num_cpus=2, no_progress_timeout_s=300)
    t0 = time.time()
    results: dict[str, list] = {a.name: [] for a in plan.arms}
    for seed in plan.seeds:
        pool_path = work / f"pool_{plan.pool_rows}_seed{seed}.parquet"
        if not pool_path.exists():
            write_pool(generate_pool(plan.pool_rows, seed=seed, mix=mix), pool_path)
        for arm in plan.arms:
            if args.report_only and not (work / f"{arm.name}_s{seed}" / "done.json").is_file():
                continue
            extra = list(args.overrides)
            if arm.match_rate_of:
                rate = next(r["run"]["label_rate"] for r in results[arm.match_rate_of] if r["run"]["seed"] == seed)
                extra.append(f"selection.random_rate={rate:.4f}")
            run = run_arm(plan, arm, seed, pool_path, work, extra)
            points = evaluate_run(run, work / f"{arm.name}_s{seed}", test_rows)
            if records:
                save_record(work / f"{arm.name}_s{seed}", records, backbone)
            results[arm.name].append({"run": run, "points": points})
            print(f"[label_efficiency] {arm.name} seed {seed}: labels {run['labels_used']} "
                  f"final F1 {points[-1]['f1']:.3f} ({time.time() - t0:.0f}s so far)", flush=True)
    results = {a: runs for a, runs in results.items() if runs}
    agg = aggregate(plan, results, work)
    reference = None
    if not args.quick:  # the quick plan's backbone is not pretrained
        from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT

        reference = surprise_reference(pretrained_backbone(), test_rows, sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT)
    report = {"plan": asdict(plan), "task_mix": asdict(mix), "test_seed": 10_000, "wall_time_s": time.time() - t0,
              "zero_label_reference": reference, "aggregate": agg, "runs": results}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(plan, agg, out / f"{stem}.md", reference)
    write_plot(plan, results, out / f"{stem}.png", reference)
    print(json.dumps(agg["headline"], indent=1), flush=True)
    return report


if __name__ == "__main__":
    main()
