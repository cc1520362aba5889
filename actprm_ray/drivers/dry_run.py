"""`jobs/active_train.py --dry_run`: the plan, the trainer's ScalingConfig and per-GPU memory estimates, in seconds.

Nothing is started or loaded: no Ray, no weights, no GPU, no hub (the backbone's architecture comes from a local
config.json or the table in model/memory.py and is built on the meta device). Each GPU role is checked against the
hardware the profile names (`cluster.gpu_memory_gb`, `cluster.num_gpus`); the exit status is 0 when everything
fits, 1 otherwise, with what does not fit and what to change. The table is also written as `dry_run.json` beside
the resolved config in the run directory when `run.output_dir` exists (a dry run never creates storage).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from actprm_ray.config import Config, run_directory, save_resolved, to_dict
from actprm_ray.model import memory as mem
from actprm_ray.model.memory import Estimate


# -- the estimates -------------------------------------------------------------------------------------------------
def trainer_estimate(cfg: Config, arch: mem.Arch) -> Estimate:
    m, t = cfg.model, cfg.train
    parts = mem.trainer_estimate(arch, dtype=m.dtype, n_heads=m.n_heads, head_hidden=m.head_hidden,
                                 micro_batch=t.micro_batch_size, max_length=m.max_length,
                                 checkpointing=m.gradient_checkpointing, attn=m.attn_implementation,
                                 strategy=t.parallel_strategy, world=t.num_workers)
    gc = "gradient checkpointing" if m.gradient_checkpointing else "no gradient checkpointing"
    detail = f"{t.parallel_strategy}, {m.dtype}, micro {t.micro_batch_size} x {m.max_length} tokens, {gc}"
    if not t.use_gpu:
        return Estimate("trainer", f"{t.num_workers} CPU workers ({detail}); not checked", parts)
    return Estimate("trainer", f"{t.num_workers} workers x {t.gpus_per_worker:g} GPU ({detail})", parts,
                    budget_gib=cfg.cluster.gpu_memory_gb * min(1.0, t.gpus_per_worker))


def scorer_estimate(cfg: Config, arch: mem.Arch) -> Estimate:
    m, p = cfg.model, cfg.pipeline
    parts = mem.scorer_estimate(arch, dtype=m.dtype, n_heads=m.n_heads, head_hidden=m.head_hidden,
                                batch=p.score_batch_size, max_length=m.max_length, pack_tokens=p.score_pack_tokens,
                                attn=m.attn_implementation, publish=cfg.train.publish)
    rows = f"packs of {p.score_pack_tokens} tokens" if p.score_pack_tokens else f"batch {p.score_batch_size}"
    detail = f"{m.dtype}, {rows} x {m.max_length} tokens, publish={cfg.train.publish}"
    if p.score_num_gpus <= 0:
        return Estimate("scorer", f"{p.score_actors} CPU actors ({detail}); not checked", parts)
    return Estimate("scorer", f"{p.score_actors} actors x {p.score_num_gpus:g} GPU ({detail})", parts,
                    budget_gib=cfg.cluster.gpu_memory_gb * min(1.0, p.score_num_gpus))


def judge_estimate(cfg: Config, arch: mem.Arch | None) -> Estimate:
    j, p = cfg.labeler.judge, cfg.pipeline
    parts, notes, problems = mem.judge_estimate(arch, dtype=j.dtype, tp=j.tensor_parallel_size,
                                                max_model_len=j.max_model_len, utilization=j.gpu_memory_utilization,
                                                gpu_gib=cfg.cluster.gpu_memory_gb)
    if j.tensor_parallel_size > 1 and p.label_num_gpus < j.tensor_parallel_size:
        problems.append(f"each labeler actor holds pipeline.label_num_gpus={p.label_num_gpus:g} GPUs but its engine "
                        f"needs labeler.judge.tensor_parallel_size={j.tensor_parallel_size}")
    if not 0 < j.gpu_memory_utilization <= 1:
        problems.append(f"labeler.judge.gpu_memory_utilization={j.gpu_memory_utilization} must lie in (0, 1]")
    where = (f"{p.label_actors} engines x TP {j.tensor_parallel_size} ({arch.name if arch else j.model}, "
             f"max_model_len {j.max_model_len or (arch.max_positions if arch else '?')})")
    return Estimate("judge", where, parts, budget_gib=cfg.cluster.gpu_memory_gb * judge_gpu_share(cfg), notes=notes,
                    extra_problems=problems, vllm=True)


def judge_gpu_share(cfg: Config) -> float:
    """The share of one GPU a judge engine may fill: pipeline.label_num_gpus for a TP-1 engine on a fraction of a
    card (the judge beside the trainer and scorer), else the whole card. vLLM's reservation (gpu_memory_utilization
    of the whole card) must stay inside it."""
    j, p = cfg.labeler.judge, cfg.pipeline
    return min(1.0, p.label_num_gpus) if j.tensor_parallel_size == 1 and p.label_num_gpus > 0 else 1.0


def _smaller(value: int) -> list[int]:
    out, v = [value], value // 2
    while v >= 1:
        out.append(v)
        v //= 2
    return out


def trainer_advice(cfg: Config, arch: mem.Arch) -> str:
    t, m = cfg.train, cfg.model
    knobs = [[("", lambda c: c)]]
    if t.parallel_strategy == "ddp" and t.num_workers > 1:
        knobs.append([("", lambda c: c), ("train.parallel_strategy=fsdp",
                                          lambda c: replace(c, train=replace(c.train, parallel_strategy="fsdp")))])
    if not m.gradient_checkpointing:
        knobs.append([("", lambda c: c), ("model.gradient_checkpointing=true",
                                          lambda c: replace(c, model=replace(c.model, gradient_checkpointing=True)))])
    # Same global batch: a smaller micro-batch with more accumulation.
    knobs.append([("" if mb == t.micro_batch_size else
                   f"train.micro_batch_size={mb} train.grad_accum={t.grad_accum * t.micro_batch_size // mb}",
                   (lambda mb: lambda c: replace(c, train=replace(
                       c.train, micro_batch_size=mb, grad_accum=t.grad_accum * t.micro_batch_size // mb)))(mb))
                  for mb in _smaller(t.micro_batch_size)])
    found = _search(lambda c: trainer_estimate(c, arch), cfg, knobs)
    return ("To fit, set " + ", or ".join(found)) if found else \
        "No combination of fsdp, gradient checkpointing and a smaller micro-batch fits: use GPUs with more memory " \
        "(cluster.gpu_memory_gb), more fsdp workers, or a shorter model.max_length"


def scorer_advice(cfg: Config, arch: mem.Arch) -> str:
    p = cfg.pipeline
    knobs = [[("", lambda c: c)]]
    if cfg.train.publish == "full":
        knobs.append([("", lambda c: c), ("train.publish=heads",
                                          lambda c: replace(c, train=replace(c.train, publish="heads")))])
    knobs.append([("" if b == p.score_batch_size else f"pipeline.score_batch_size={b}",
                   (lambda b: lambda c: replace(c, pipeline=replace(c.pipeline, score_batch_size=b)))(b))
                  for b in _smaller(p.score_batch_size)])
    found = _search(lambda c: scorer_estimate(c, arch), cfg, knobs)
    return ("To fit, set " + ", or ".join(found)) if found else \
        "Neither train.publish=heads nor a smaller pipeline.score_batch_size fits: give each scorer a GPU with more " \
        "memory (cluster.gpu_memory_gb)"


def _search(make, cfg: Config, knobs: list[list[tuple]], keep: int = 2) -> list[str]:
    """Combinations of knob settings (each knob: (override text, config -> config); the first = as configured)
    whose estimate fits, fewest changes first, then the earliest (largest) settings: the overrides to print."""
    import itertools

    found = []
    for combo in itertools.product(*[range(len(k)) for k in knobs]):
        candidate = cfg
        for knob, i in zip(knobs, combo):
            candidate = knob[i][1](candidate)
        e = make(candidate)
        if e.fits:
            changes = [knob[i][0] for knob, i in zip(knobs, combo) if knob[i][0]]
            found.append((len(changes), combo, f"{' '.join(changes)} (~{e.required_gib:.0f} GiB)"))
    found.sort(key=lambda f: (f[0], f[1]))
    return [f[2] for f in found[:keep] if f[0]]


JUDGE_ADVICE = ("To fit, raise labeler.judge.tensor_parallel_size (with pipeline.label_num_gpus to match), raise "
                "labeler.judge.gpu_memory_utilization, or lower labeler.judge.max_model_len")


def gpu_count(cfg: Config) -> tuple[dict, list[str], list[str]]:
    """GPUs the run holds at its smallest (one actor per pool) and largest; (counts, problems, notes)."""
    t, p = cfg.train, cfg.pipeline
    train = t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0
    score = (0.0, 0.0) if cfg.selection.inline else (p.score_num_gpus, p.score_actors * p.score_num_gpus)
    label = (p.label_num_gpus, p.label_actors * p.label_num_gpus)
    counts = {"trainer": train, "scorer_min": score[0], "scorer_max": score[1], "judge_min": label[0],
              "judge_max": label[1], "min": train + score[0] + label[0], "max": train + score[1] + label[1],
              "cluster": cfg.cluster.num_gpus}
    problems, notes = [], []
    have = cfg.cluster.num_gpus
    if have is not None:
        if counts["min"] > have:
            problems.append(f"GPUs: the run needs at least {counts['min']:g} (trainer {train:g} + one scorer "
                            f"{score[0]:g} + one labeler {label[0]:g}) but cluster.num_gpus={have}: lower "
                            "train.num_workers or the per-actor GPUs, or add GPUs")
        elif counts["max"] > have:
            notes.append(f"GPUs: full actor pools need {counts['max']:g} of {have}; Ray Data runs fewer actors")
    return counts, problems, notes


def estimate(cfg: Config) -> tuple[list[Estimate], dict, list[str]]:
    """(estimates, architectures used, problems that stop the estimate itself)."""
    archs: dict[str, mem.Arch | None] = {}
    problems: list[str] = []
    estimates: list[Estimate] = []
    try:
        archs["backbone"] = backbone = mem.resolve_arch(cfg.model.backbone,
                                                        trust_remote_code=cfg.model.trust_remote_code)
    except mem.UnknownArchitecture as e:
        problems.append(f"model.backbone: {e}")
        backbone = None
    if backbone is not None:
        trainer = trainer_estimate(cfg, backbone)
        if trainer.fits is False:
            trainer.advice = trainer_advice(cfg, backbone)
        estimates.append(trainer)
        if not cfg.selection.inline:
            scorer = scorer_estimate(cfg, backbone)
            if scorer.fits is False:
                scorer.advice = scorer_advice(cfg, backbone)
            estimates.append(scorer)
    if cfg.labeler.kind == "vllm":
        try:
            archs["judge"] = judge_arch = mem.resolve_arch(cfg.labeler.judge.model)
        except mem.UnknownArchitecture:
            archs["judge"] = judge_arch = None
        judge = judge_estimate(cfg, judge_arch)
        if judge.fits is False:
            share = judge_gpu_share(cfg)
            judge.advice = (f"To fit beside the other roles on one GPU, lower labeler.judge.gpu_memory_utilization "
                            f"to <= {share:g} (vLLM takes that share of the whole card) or raise "
                            f"pipeline.label_num_gpus" if share < 1 else JUDGE_ADVICE)
        estimates.append(judge)
    return estimates, archs, problems


# -- plan and scaling, built without starting anything -------------------------------------------------------------
def plan_and_scaling(cfg: Config) -> tuple[str, list[str], dict]:
    from actprm_ray.pipeline.plan import build_active_plan
    from actprm_ray.train.trainer import scaling_config

    source = cfg.data.pool or f"synthetic pool ({cfg.data.synthetic_rows} rows, generated at run start)"
    # No coordinator name: the plan is described, never applied, so no actor is looked up (and Ray is not started).
    plan = build_active_plan(cfg, init_dir=str(run_directory(cfg) / "init"), coordinator_name="", source=source)
    s = scaling_config(cfg)
    scaling = {"num_workers": s.num_workers, "use_gpu": s.use_gpu, "resources_per_worker": s.resources_per_worker}
    return plan.describe(), plan.stage_names(), scaling


# -- the printout --------------------------------------------------------------------------------------------------
def render_estimate(e: Estimate) -> list[str]:
    lines = [f"  {e.role}: {e.where}"]
    for p in e.parts:
        phase = "" if p.phase == "always" else f" [{p.phase}]"
        lines.append(f"    {p.name + phase:<36} {p.gib:8.2f}   {p.formula}")
    for n in e.notes:
        lines.append(f"    {n}")
    if e.vllm:
        lines.append(f"    {'= reserved by vLLM':<36} {e.required_gib:8.2f}")
    else:
        lines.append(f"    {'= peak (' + e.peak_phase + ')':<36} {e.peak_bytes / mem.GiB:8.2f}")
        lines.append(f"    {'needs (+10% fragmentation, +2 GiB)':<36} {e.required_gib:8.2f}")
    if e.budget_gib is not None:
        verdict = "fits" if e.fits else "DOES NOT FIT"
        lines.append(f"    {'GPU memory':<36} {e.budget_gib:8.2f}   {verdict}")
    for prob in e.extra_problems:
        lines.append(f"    problem: {prob}")
    return lines


def failures(estimates: list[Estimate]) -> list[str]:
    out = []
    for e in estimates:
        if e.fits is False:
            what = "; ".join(e.extra_problems) or f"needs ~{e.required_gib:.1f} GiB per GPU, the GPU has {e.budget_gib:g}"
            out.append(f"{e.role} ({e.where}): {what}" + (f". {e.advice}" if e.advice else ""))
    return out


def dry_run(cfg: Config, config_path: str | None = None, out=sys.stdout) -> int:
    """Print the plan, the ScalingConfig and the per-GPU estimates; 0 if everything fits, else 1."""
    described, stage_names, scaling = plan_and_scaling(cfg)
    estimates, archs, problems = estimate(cfg)
    counts, gpu_problems, gpu_notes = gpu_count(cfg)
    problems += failures(estimates) + gpu_problems

    say = lambda text="": print(text, file=out)  # noqa: E731
    say(f"[actprm] dry run of {config_path or 'the embedded default'}: no Ray started, no weights loaded")
    say(f"[actprm] plan:\n{described}")
    say(f"[actprm] trainer ScalingConfig(num_workers={scaling['num_workers']}, use_gpu={scaling['use_gpu']}, "
        f"resources_per_worker={scaling['resources_per_worker']})")
    for role, a in archs.items():
        if a is None:
            say(f"[actprm] {role} {cfg.labeler.judge.model}: architecture unknown (no config.json, not in the table)")
        else:
            say(f"[actprm] {role} {a.name}: {a.params_backbone:,} params without the LM head, {a.params_causal_lm:,} "
                f"with; h={a.hidden} I={a.intermediate} L={a.layers} heads={a.heads}/{a.kv_heads} kv, vocab {a.vocab} "
                f"(from {a.source})")
    say(f"[actprm] memory per GPU in GiB: estimates, not measurements (formulas: actprm_ray/model/memory.py), "
        f"GPU = cluster.gpu_memory_gb {cfg.cluster.gpu_memory_gb:g} GiB")
    for e in estimates:
        for line in render_estimate(e):
            say(line)
    have = "not checked (cluster.num_gpus unset)" if counts["cluster"] is None else f"of {counts['cluster']}"
    say(f"[actprm] GPUs: trainer {counts['trainer']:g} + scorers {counts['scorer_max']:g} (min {counts['scorer_min']:g})"
        f" + labelers {counts['judge_max']:g} (min {counts['judge_min']:g}) = {counts['max']:g} {have}")
    for n in gpu_notes:
        say(f"[actprm] note: {n}")

    report = {"config": config_path, "plan": described.splitlines(), "stages": stage_names,
              "scaling_config": scaling, "gpu_memory_gb": cfg.cluster.gpu_memory_gb, "gpus": counts,
              "architectures": {k: (None if a is None else a.__dict__) for k, a in archs.items()},
              "estimates": [e.to_dict() for e in estimates], "problems": problems, "fits": not problems,
              "headroom": {"reserve_gib": mem.RESERVE_GIB, "fragmentation": mem.FRAGMENTATION,
                           "vllm_runtime_gib": mem.VLLM_RUNTIME_GIB}}
    if Path(cfg.run.output_dir).expanduser().is_dir():
        directory = run_directory(cfg)
        save_resolved(cfg, directory)
        (directory / "dry_run.json").write_text(json.dumps(report | {"resolved": to_dict(cfg)}, indent=2))
        say(f"[actprm] written: {directory / 'config.yaml'} and {directory / 'dry_run.json'}")
    else:
        say(f"[actprm] not written: run.output_dir {cfg.run.output_dir} does not exist here")
    if problems:
        print("[actprm] dry run FAILED: this profile does not fit the hardware it names:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    say("[actprm] dry run OK: every GPU role fits")
    return 0
