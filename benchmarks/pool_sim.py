"""Pool-based simulation of active PRM training (the paper's setting), in one process, on the project's own code.

Rows arrive in micro-batches; the current model scores each batch (the scorer's `score_encoded`), the selection
rule (`actprm_ray.select`) decides which rows to label, the oracle reveals their labels, and labelled rows are
trained in full micro-batches by `actprm_ray.train.step` (the Ray Train worker's step). So there is one step,
one loss and one selection rule; what this drops is the streaming (no lag between scoring and training) and Ray.
It runs the threshold grid and the recipe probes; the headline arms run through the streaming loop
(benchmarks/label_efficiency.py).

    python benchmarks/pool_sim.py --pool-rows 10000 --seed 0 --backbone runs/backbones/tiny_math \\
        selection.mode=all train.lr=1e-3          # any Config override after the flags

Prints one line per evaluation and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from actprm_ray.config import DEFAULT_CONFIG, Config, load_config  # noqa: E402
from actprm_ray.data.step_format import encode_trajectory  # noqa: E402
from actprm_ray.eval.curves import f1_at_budget as f1_at  # noqa: E402
from actprm_ray.eval.curves import labels_to_reach, plot_label_efficiency, t_interval  # noqa: E402
from actprm_ray.eval.curves import surprise_reference as curve_reference  # noqa: E402
from actprm_ray.eval.metrics import first_error_metrics, first_error_prediction  # noqa: E402
from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig  # noqa: E402
from actprm_ray.model.scoring import score_encoded  # noqa: E402
from actprm_ray.pipeline.stages import SelectStage  # noqa: E402
from actprm_ray.select import RateController, ablation_thresholds, pseudo_labels, wilson_interval  # noqa: E402
from actprm_ray.train.replay import ReplayBuffer, replay_row  # noqa: E402
from actprm_ray.train.step import build_optimizer, inline_labels, micro_step, optimizer_step  # noqa: E402

VALIDATION_SEED = 20_000  # recipe choices are made on this split; the test split is only reported
TEST_SEED = 10_000


def encode_rows(tokenizer, rows: list[dict], cfg: Config) -> list[dict]:
    out = []
    for r in rows:
        e = encode_trajectory(tokenizer, r["question"], r["steps"], sep=cfg.model.sep,
                              system_prompt=cfg.model.system_prompt, max_length=cfg.model.max_length)
        out.append({"id": r["id"], "input_ids": e.input_ids, "readout_positions": e.readout_positions,
                    "oracle_first_error_step": int(r["first_error_step"])})
    return out


def evaluate(model: EnsemblePRM, encoded: list[dict], tau: float = 0.5) -> dict:
    model.eval()
    scores = score_encoded(model, encoded, batch_size=64)
    preds = [first_error_prediction(s["step_mean"], tau) for s in scores]
    return first_error_metrics([r["oracle_first_error_step"] for r in encoded], preds)


def fresh_model(backbone: str, cfg: Config) -> EnsemblePRM:
    torch.manual_seed(cfg.run.seed)
    return EnsemblePRM.from_backbone(backbone, PRMConfig.from_config(cfg))


def simulate(cfg: Config, backbone: str, pool: list[dict], evals: dict[str, list[dict]], *, eval_every: int,
             ablation: str = "both", passes: int = 1, log=print) -> dict:
    """Run one arm over the pool; evaluate every `eval_every` labels. passes > 1 re-trains each full labelled
    micro-batch that many times in a row; train.replay > 0 follows each new micro-batch with that many
    micro-batches drawn from the rows labelled so far by the streaming trainer's replay buffer (labels, not compute,
    are what the experiment counts)."""
    torch.manual_seed(cfg.run.seed)
    model = fresh_model(backbone, cfg)
    encoded = encode_rows(model.tokenizer, pool, cfg)
    eval_enc = {name: encode_rows(model.tokenizer, rows, cfg) for name, rows in evals.items()}
    optimizer, scheduler = build_optimizer(model, model, cfg.train)
    sel, t = cfg.selection, cfg.train
    thresholds = ablation_thresholds(ablation, sel.delta_pred, sel.delta_std)
    controller = (RateController(sel.target_rate, window=sel.controller_window, accuracy_floor=sel.accuracy_floor,
                                 min_audits=sel.min_audits) if sel.target_rate is not None else None)
    select = SelectStage(mode=sel.mode, step_threshold=sel.step_threshold, random_rate=sel.random_rate, seed=sel.seed,
                         audit_rate=sel.audit_rate, controller=controller, **thresholds)
    labels = steps = trusted = trusted_right = audited = audit_right = draws = 0
    buffer: list[dict] = []
    replay = ReplayBuffer(t.replay_buffer_rows, seed=cfg.run.seed, rank=0)
    points = [{"labels": 0, "steps": 0, **{k: evaluate(model, v)["f1"] for k, v in eval_enc.items()}}]
    rates: list[dict] = []  # the label rate as the pool streams by (the controller's trace)
    next_eval, t0 = eval_every, time.time()
    for start in range(0, len(encoded), t.micro_batch_size):
        batch = encoded[start:start + t.micro_batch_size]
        if sel.mode == "active":
            model.eval()
            scores = score_encoded(model, batch, batch_size=len(batch))
        else:
            scores = [{"step_mean": [], "step_std": []} for _ in batch]
        decided = select({"id": [r["id"] for r in batch], "valid": [True] * len(batch),
                          "step_mean": [s["step_mean"] for s in scores], "step_std": [s["step_std"] for s in scores]})
        audits = []
        for r, take, audit, s in zip(batch, decided["selected"], decided["audit"], scores):
            want = inline_labels(r["oracle_first_error_step"], len(r["readout_positions"]))
            if take:
                buffer.append({**r, "hard_labels": want})
                labels += 1
            if audit:  # the oracle stands in for the judge: its label is the audit's answer
                audits.append(pseudo_labels(s["step_mean"], sel.step_threshold) == want)
            elif not take and sel.mode == "active":
                trusted += 1
                trusted_right += pseudo_labels(s["step_mean"], sel.step_threshold) == want
        audited, audit_right = audited + len(audits), audit_right + sum(audits)
        if controller is not None and audits:
            controller.record_audits(audits)
        seen = start + len(batch)
        if seen % 512 < t.micro_batch_size:
            rates.append({"seen": seen, "labels": labels, "rate": labels / seen,
                          "scale": controller.scale if controller else 1.0,
                          "guarded": bool(controller.guarded) if controller else False})
        while len(buffer) >= t.micro_batch_size:
            rows, buffer = buffer[:t.micro_batch_size], buffer[t.micro_batch_size:]
            for r in rows:
                replay.add(replay_row(r, inline=False))
            replayed = []
            for _ in range(t.replay):
                replayed.append(replay.draw(t.micro_batch_size, draws))
                draws += 1
            for micro_batch in [rows] * passes + replayed:
                micro_step(model, model, micro_batch, cfg)
                optimizer_step(model, optimizer, scheduler, t.grad_clip)
                steps += 1
        if labels >= next_eval:
            point = {"labels": labels, "steps": steps, "seen": start + len(batch),
                     **{k: evaluate(model, v)["f1"] for k, v in eval_enc.items()}}
            points.append(point)
            log(json.dumps({**point, "s": round(time.time() - t0, 1)}))
            next_eval += eval_every
    final = {"labels": labels, "steps": steps, "seen": len(encoded)}
    for k, v in eval_enc.items():
        m = evaluate(model, v)
        final.update({k: m["f1"], f"{k}_acc_err": m["acc_err"], f"{k}_acc_cor": m["acc_cor"]})
    if points[-1]["labels"] != labels:
        points.append({kk: final[kk] for kk in ["labels", "steps", "seen", *eval_enc]})
    return dict(points=points, final=final, label_rate=labels / max(1, len(encoded)), trusted=trusted,
                trusted_accuracy=(trusted_right / trusted) if trusted else math.nan,
                audited=audited, audited_accuracy=(audit_right / audited) if audited else math.nan,
                audited_accuracy_95=list(wilson_interval(audit_right, audited)), rate_trace=rates,
                controller=controller.state() if controller else None, seconds=time.time() - t0)


# --- the grid: arms x seeds, resumable, aggregated ----------------------------------------------------------
GRID_ARMS: dict[str, tuple[list[str], str]] = {  # name -> (config overrides, ablation)
    "all": (["selection.mode=all"], "both"),
    **{f"active_dp{dp}_ds{ds}": (["selection.mode=active", f"selection.delta_pred={dp}", f"selection.delta_std={ds}"],
                                 "both") for dp in (0.9, 0.95, 0.97) for ds in (0.01, 0.005, 0.002)},
    "aleatoric_only": (["selection.mode=active"], "aleatoric_only"),
    "epistemic_only": (["selection.mode=active"], "epistemic_only"),
    "random": (["selection.mode=random"], "both"),  # rate-matched per seed to PAPER_ARM
    # Beyond the paper: the label-rate controller (paper thresholds as its starting scale), 2% audits.
    **{f"controller_r{r}": (["selection.mode=active", f"selection.target_rate={r}", "selection.audit_rate=0.02"],
                            "both") for r in (0.3, 0.5)},
}
PAPER_ARM = "active_dp0.95_ds0.005"


def _grid_task(task: dict) -> str:
    """One (arm, seed) run in a worker process; its JSON is the resume marker."""
    from actprm_ray.data.synthetic import MIXES, generate_pool

    torch.set_num_threads(task["threads"])
    out = Path(task["out"])
    if out.is_file():
        return str(out)
    cfg = load_config(DEFAULT_CONFIG, task["overrides"])
    mix = MIXES[task["mix"]]
    pool = generate_pool(task["pool_rows"], seed=task["seed"], mix=mix)
    # The grid reports; recipe choices were made on the validation split (single runs, --split val) before it.
    evals = {"test": generate_pool(task["eval_rows"], seed=TEST_SEED, mix=mix)}
    result = simulate(cfg, task["backbone"], pool, evals, eval_every=task["eval_every"], ablation=task["ablation"],
                      passes=task["passes"], log=lambda line: None)
    result.update(arm=task["arm"], seed=task["seed"], overrides=task["overrides"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(out)
    return str(out)


def run_grid(args, recipe: list[str]) -> dict:
    """Every arm x seed (resumable: finished runs are skipped), random last (it needs the paper arm's rate)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    work = Path(args.work)
    arms = args.arms or list(GRID_ARMS)

    def task(arm: str, seed: int, extra: list[str] = ()) -> dict:
        overrides, ablation = GRID_ARMS[arm]
        return dict(arm=arm, seed=seed, ablation=ablation, out=str(work / f"{arm}_s{seed}.json"),
                    overrides=[f"run.seed={seed}", f"model.init_seed={seed}", f"selection.seed={seed}", *recipe,
                               *overrides, *extra],
                    backbone=args.backbone, mix=args.mix, pool_rows=args.pool_rows, eval_rows=args.eval_rows,
                    eval_every=args.eval_every, passes=args.passes,
                    threads=args.threads)

    def load(arm, seed):
        return json.loads((work / f"{arm}_s{seed}.json").read_text())

    t0 = time.time()
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        first = [task(a, s) for s in args.seeds for a in arms if a != "random"]
        for done in pool.map(_grid_task, first):
            print(f"[pool_sim] {Path(done).stem} ({time.time() - t0:.0f}s)", flush=True)
        if "random" in arms:
            rand = [task("random", s, [f"selection.random_rate={load(PAPER_ARM, s)['label_rate']:.4f}"])
                    for s in args.seeds]
            for done in pool.map(_grid_task, rand):
                print(f"[pool_sim] {Path(done).stem} ({time.time() - t0:.0f}s)", flush=True)
    runs = {a: [load(a, s) for s in args.seeds] for a in arms}
    report = aggregate(runs, args)
    report["zero_label_reference"] = surprise_reference(args)
    # The curves behind the table, so `--render` redraws the figure and table without a rerun.
    report["runs"] = {a: [{k: r.get(k) for k in ("seed", "points", "final", "label_rate", "trusted_accuracy", "audited",
                                                  "audited_accuracy", "audited_accuracy_95", "rate_trace",
                                                  "controller", "overrides", "seconds")} for r in rs]
                      for a, rs in runs.items()}
    report["args"] = {k: v for k, v in vars(args).items() if k not in ("out",)}
    report["recipe"] = recipe
    return report


def surprise_reference(args) -> dict:
    """F1 of the pretrained LM's surprise detector (no labels) on the same test rows: the figure's reference line."""
    from actprm_ray.data.synthetic import MIXES, generate_pool

    cfg = load_config(DEFAULT_CONFIG, [])
    rows = generate_pool(args.eval_rows, seed=TEST_SEED, mix=MIXES[args.mix])
    return curve_reference(args.backbone, rows, sep=cfg.model.sep, system_prompt=cfg.model.system_prompt)


def aggregate(runs: dict[str, list[dict]], args) -> dict:
    """Per arm: label rate, final F1, labels to reach the full-data F1 (per seed, paired), F1 at 50% budget;
    active - random at 50%, paired by seed. Means with 95% t-intervals over seeds. Test split only."""
    half = args.pool_rows // 2
    table = {}
    for arm, rs in runs.items():
        reach = []
        if "all" in runs:
            for r, full in zip(rs, runs["all"]):
                need = labels_to_reach(r["points"], full["final"]["test"], "test")
                reach.append(need / args.pool_rows if need is not None else math.nan)
        table[arm] = dict(
            label_rate=t_interval([r["label_rate"] for r in rs]),
            final_f1=t_interval([r["final"]["test"] for r in rs]),
            f1_at_half=t_interval([f1_at(r["points"], half, "test") or 0.0 for r in rs]),
            trusted_accuracy=t_interval([r["trusted_accuracy"] for r in rs if not math.isnan(r["trusted_accuracy"])]
                                        or [math.nan]),
            audited_accuracy=t_interval([r["audited_accuracy"] for r in rs
                                         if not math.isnan(r.get("audited_accuracy", math.nan))] or [math.nan]),
            audits=[r.get("audited", 0) for r in rs],
            rate_error_vs_target=[(r["label_rate"] - r["controller"]["target_rate"]) / r["controller"]["target_rate"]
                                  for r in rs if r.get("controller")],
            reach_full_f1_frac=reach, seeds=[r["seed"] for r in rs])
    paired = {}
    if "random" in runs:
        for arm in (a for a in runs if a.startswith("active") or a.endswith("_only")):
            diffs = [(f1_at(a["points"], half, "test") or 0.0) - (f1_at(r["points"], half, "test") or 0.0)
                     for a, r in zip(runs[arm], runs["random"])]
            paired[arm] = t_interval(diffs)
    # The controller against fixed thresholds at equal labels: its final F1 minus the paper arm's F1 at the
    # controller's label count, paired by seed (the paper arm runs on, so it has a point there).
    versus_fixed = {}
    for arm in (a for a in runs if a.startswith("controller") and PAPER_ARM in runs):
        diffs = [c["final"]["test"] - (f1_at(f["points"], c["final"]["labels"], "test") or 0.0)
                 for c, f in zip(runs[arm], runs[PAPER_ARM])]
        versus_fixed[arm] = t_interval(diffs)
    return dict(table=table, active_minus_random_at_half=paired, controller_minus_fixed_at_equal_labels=versus_fixed)


FIGURE_ARMS = ("all", PAPER_ARM, "random", "controller_r0.5", "aleatoric_only")


def write_grid_outputs(report: dict, out: Path) -> None:
    """`out` (JSON) plus its .png (Fig. 2a's shape) and .md (the table), all from the report alone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    runs, pool_rows = report["runs"], report["args"]["pool_rows"]
    refs = {}
    if "all" in report["table"]:
        refs["full-data final F1"] = report["table"]["all"]["final_f1"][0]
    if report.get("zero_label_reference", {}).get("f1") is not None:
        refs["zero-label LM surprise"] = report["zero_label_reference"]["f1"]
    shown = [a for a in FIGURE_ARMS if a in runs]
    traces = {a: [r["rate_trace"] for r in runs[a]] for a in shown if a.startswith(("controller", "active"))}
    targets = {a: runs[a][0]["controller"]["target_rate"] for a in traces if runs[a][0].get("controller")}
    seeds = len(next(iter(runs.values())))
    plot_label_efficiency({a: [r["points"] for r in runs[a]] for a in shown}, out.with_suffix(".png"),
                          pool_rows=pool_rows, key="test", references=refs, rate_traces=traces, targets=targets,
                          title=f"Pool simulation, pretrained tiny PRM, {seeds} seeds (band: 95% t-interval)")
    def cell(v):
        m, lo, hi = v
        return "—" if m is None or math.isnan(m) else (f"{m:.3f}" if math.isnan(lo) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]")

    lines = ["| arm | label rate | final test F1 | F1 at 50% labels | trusted pseudo-label acc (oracle) | "
             "audited acc | labels to reach `all`'s final F1 (per seed, % of pool) |", "|---|---|---|---|---|---|---|"]
    for arm, row in report["table"].items():
        reach = ", ".join("never" if math.isnan(x) else f"{100 * x:.0f}%" for x in row["reach_full_f1_frac"])
        lines.append(f"| {arm} | {cell(row['label_rate'])} | {cell(row['final_f1'])} | {cell(row['f1_at_half'])} | "
                     f"{cell(row['trusted_accuracy'])} | {cell(row.get('audited_accuracy', [math.nan] * 3))} | "
                     f"{reach} |")
    lines += ["", "Paired by seed (mean [95% t-interval]):", ""]
    for arm, v in report["active_minus_random_at_half"].items():
        lines.append(f"- {arm} − random, F1 at 50% labels: {cell(v)}")
    for arm, v in report.get("controller_minus_fixed_at_equal_labels", {}).items():
        lines.append(f"- {arm} − {PAPER_ARM} at the controller's labels: {cell(v)}")
    for arm in (a for a in report["table"] if a.startswith("controller")):
        errs = report["table"][arm]["rate_error_vs_target"]
        lines.append(f"- {arm}: label rate − target, relative, per seed: "
                     + ", ".join(f"{100 * e:+.1f}%" for e in errs))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    from actprm_ray.data.synthetic import MIXES, generate_pool

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-rows", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0, help="pool data seed and training seed")
    ap.add_argument("--eval-rows", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--split", default="val", choices=["val", "val+test"], help="test only when reporting")
    ap.add_argument("--backbone", default="", help="a pretrained backbone directory (required unless --render)")
    ap.add_argument("--mix", default="addsub")
    ap.add_argument("--ablation", default="both")
    ap.add_argument("--passes", type=int, default=1, help="train each labelled micro-batch this many times in a row")
    ap.add_argument("--out", default="")
    ap.add_argument("--grid", action="store_true", help="run every arm x --seeds (resumable) and aggregate")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--arms", nargs="+", default=None, help=f"grid arms (default all): {', '.join(GRID_ARMS)}")
    ap.add_argument("--work", default=str(REPO / "runs" / "pool_sim"))
    ap.add_argument("--jobs", type=int, default=2, help="grid runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per grid run")
    ap.add_argument("--render", default="", help="re-draw the PNG and table of a finished grid's JSON and exit")
    args, overrides = ap.parse_known_args(argv)
    if args.render:  # re-aggregates from the stored runs, so a table change needs no re-run
        report = json.loads(Path(args.render).read_text())
        report.update(aggregate(report["runs"], argparse.Namespace(**report["args"])))
        write_grid_outputs(report, Path(args.render))
        return report
    if not args.backbone:
        ap.error("--backbone is required (build one with `python jobs/pretrain.py`)")
    if args.grid:
        report = run_grid(args, overrides)
        print(json.dumps({k: report[k] for k in report if k != "runs"}, indent=1, default=str))
        if args.out:
            write_grid_outputs(report, Path(args.out))
        return report
    cfg = load_config(DEFAULT_CONFIG, [f"run.seed={args.seed}", *overrides])
    mix = MIXES[args.mix]
    pool = generate_pool(args.pool_rows, seed=args.seed, mix=mix)
    evals = {"val": generate_pool(args.eval_rows, seed=VALIDATION_SEED, mix=mix)}
    if args.split == "val+test":
        evals["test"] = generate_pool(args.eval_rows, seed=TEST_SEED, mix=mix)
    result = simulate(cfg, args.backbone, pool, evals, eval_every=args.eval_every, ablation=args.ablation,
                      passes=args.passes)
    result["args"] = {**vars(args), "overrides": overrides}
    print(json.dumps({"final": result["final"], "label_rate": result["label_rate"],
                      "trusted_accuracy": result["trusted_accuracy"], "seconds": round(result["seconds"], 1)}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
