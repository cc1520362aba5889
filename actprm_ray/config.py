"""One typed config tree for every job: dataclass defaults <- conf/*.yaml <- `a.b=c` command-line overrides.

OmegaConf's structured mode rejects unknown keys and wrong types and names the key; `validate` then checks
the semantic rules and reports every problem at once. Each field's comment is its help text (the config
reference in docs/CONFIG.md is generated from them by scripts/gen_config_doc.py). OmegaConf is imported where it
is used: the dataclasses alone (what model/ reads its defaults from) need nothing beyond the standard library, so
the GPU benchmark (benchmarks/gpu_scoring.py) runs where only torch and transformers are installed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit


# The schema imports nothing else from the package (only the pure step-format constants), so every package may
# import it without a cycle; the names below are owned here and read by the code that implements them.
from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT

# Part of the label-cache key: bump with any change to the judge prompt's text or tags (label/prompt.py), so a new
# prompt never reuses critiques written for the old one; tests/test_judge_parse.py pins the prompt to the version.
JUDGE_PROMPT_VERSION = "actprm-judge-v1"
EVAL_BENCHMARKS = ("processbench", "prmbench", "first_error")  # what eval/runner.py runs
FIRST_ERROR_FORMATS = ("big_bench_mistake", "champ_fws", "mr_ben", "mr_gsm8k_partial",
                       "reasoneval_invalid")  # eval/first_error.FORMATS' keys (tests/test_config.py)
# Rows above this many tokens are unscorable (listed with the reason), not truncated: 4x the longest benchmark row
# we know (~8k tokens), far beyond any real trajectory, so only corrupt rows hit it.
MAX_EVAL_TOKENS = 32768
TRACKING_INSTALL_HINT = "pip install -e '.[tracking]'"


@dataclass
class ModelConfig:
    backbone: str = "tiny"  # HF dir of a decoder-only LM; "tiny" / "tiny:small": random-init test backbone; "tiny-math": tiny, pretrained on correct synthetic solutions (jobs/pretrain.py; built on first use, cached in $ACTPRM_MODELS_DIR or ~/.cache/actprm_ray/models/tiny_math); "smollm2-135m" / "gemma3-270m": SmolLM2-135M-Instruct / Gemma 3 270M (base) converted from its PyPI GGUF on first use (model/import_gguf.py; cached in $ACTPRM_MODELS_DIR or ~/.cache/actprm_ray/models)
    n_heads: int = 32  # ensemble size n (METHOD §3)
    head_hidden: int = 128  # width of each head's two hidden layers
    init_seed: int = 0  # seed of the explicit head initialisation, recorded in the checkpoint
    init: str = "normal"  # "normal" (what the original code ran) or "truncated"
    sep: str = DEFAULT_SEP  # step separator token; added to the tokenizer if missing
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # the one system string used by training, scoring and evaluation
    dtype: str = "float32"  # backbone dtype: float32 | bfloat16 (heads always run in fp32)
    max_length: int = 2048  # right truncation for training and loop scoring (no truncation at evaluation)
    trust_remote_code: bool = False  # run code shipped with a checkpoint; off unless you trust its author
    gradient_checkpointing: bool = False  # trade compute for memory in the trainer
    attn_implementation: str = "sdpa"  # attention kernel of the backbone, in the trainer and the scorers (flash_attention_2 needs a GPU, bf16/fp16 and the flash-attn package)


@dataclass
class DataConfig:
    pool: str = ""  # pool of trajectories (Parquet/JSONL file or directory, any pyarrow URI); "" = synthetic pool
    synthetic_rows: int = 2000  # size of the synthetic pool when `pool` is ""
    synthetic_seed: int = 0  # seed of the synthetic pool
    synthetic_mix: str = "default"  # task mix of the synthetic pool: a data.synthetic.MIXES name
    limit: Optional[int] = None  # read at most this many rows (None = all)


@dataclass
class SelectionConfig:
    mode: str = "active"  # active (ActPRM) | all (full-data baseline) | random (label-rate baseline) | none
    delta_pred: float = 0.95  # aleatoric threshold δ_pred; 0.5 disables it (epistemic-only ablation)
    delta_std: float = 0.005  # epistemic threshold δ_std; .inf disables it (aleatoric-only ablation)
    step_threshold: float = 0.5  # µ below this marks the predicted first error
    unbiased_std: bool = False  # σ estimator: population (default) or n-1
    random_rate: float = 0.5  # selection probability in mode=random (match it to the active arm's label rate)
    seed: int = 0  # seed of mode=random (per-row hash, so independent of batching)
    inline: bool = False  # paper's Algorithm 1: select inside the trainer's forward pass, no separate scorer
    # Beyond the paper (mode active, streaming and pool simulation): docs/RESULTS.md shows why a user needs them.
    audit_rate: float = 0.0  # share of trusted rows labelled anyway: an unbiased pseudo-label accuracy estimate
    target_rate: Optional[float] = None  # hold this label rate by scaling both thresholds (None = fixed thresholds)
    accuracy_floor: float = 0.8  # the controller trusts nothing while audited accuracy is below this
    controller_window: int = 512  # recent rows whose scores set the controller's threshold scale
    min_audits: int = 20  # audits (of the last 100) needed before the floor can trip


@dataclass
class LossConfig:
    bce: str = "pooled"  # pooled (released code) | per_trajectory (paper)
    regularizer: str = "element_mean"  # element_mean (λ·mean (θ-θ0)²) | per_head_sum ((λ/n)·Σ‖φ-φ0‖²)
    reg_lambda: float = 0.5  # λ of the anchor regulariser (0 when n_heads == 1)
    p_keep: float = 1.0  # bootstrap mask: keep each (head, row) pair with this probability


@dataclass
class TrainConfig:
    lr: float = 1e-5  # peak learning rate (linear warm-up then linear decay)
    head_lr: Optional[float] = None  # peak learning rate of the ensemble heads (None = lr)
    warmup_steps: int = 500  # linear warm-up steps
    total_steps: Optional[int] = None  # LR schedule length; None = estimated from the pool size
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # rows per device per forward
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = workers x micro x accum)
    # Labels, not compute, are the judge bill: replaying the labels already paid for is what took the tiny backbone
    # off its "every step correct" plateau (docs/RESULTS.md, recipe probes round 3). Each rank keeps its buffer's
    # token ids in memory and in every checkpoint (0.9 MB of Parquet for 8,020 tiny-task rows; train/replay.py).
    replay: int = 0  # after each micro-batch of new labelled rows, this many drawn from the rows trained so far (0 = each row once)
    replay_buffer_rows: int = 10_000  # per rank: every trained row until full, then a uniform sample of them (bounds memory and checkpoints)
    num_workers: int = 1  # Ray Train workers
    parallel_strategy: str = "ddp"  # ddp (Ray Train's prepare_model) | fsdp (FSDP2 per decoder layer, heads replicated; shards params/grads/optimizer for 7B+; CPU or GPU)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    publish_every: int = 2  # optimizer steps between weight publishes (model_version += 1)
    publish: str = "full"  # full (backbone + heads) | heads (heads only; for large frozen-ish backbones, see README)
    checkpoint_every: int = 50  # optimizer steps between Ray Train checkpoints
    checkpoints_to_keep: int = 2  # newest Ray Train checkpoints kept on storage (resume and max_failures use the last)
    # Optimizer steps between metrics-only ray.train.report calls (0 = only with checkpoints). Each report carries
    # every step's metrics since the last, so metrics.jsonl has a line per step whatever this is; fewer reports
    # spare the trainer the wait for the Train controller's poll (up to 2 s each).
    report_every: int = 50
    max_failures: int = 0  # Ray Train FailureConfig: worker-group restarts from the last checkpoint
    step_delay_s: float = 0.0  # test hook: sleep after each optimizer step to emulate a slow trainer


@dataclass
class PipelineConfig:
    score_actors: int = 1  # scorer actor pool size (max; min is 1)
    score_batch_size: int = 16  # rows per scorer call
    score_pack_tokens: int = 0  # >0: the scorer packs rows into lines of this many tokens, no padding (exact; pays with flash-attention-2)
    score_num_cpus: float = 0.25
    score_num_gpus: float = 0.0
    label_actors: int = 1  # labeler actor pool size
    label_batch_size: int = 16
    label_num_cpus: float = 0.25
    label_num_gpus: float = 0.0
    map_num_cpus: float = 0.25  # CPU share of stateless map stages (canonicalise/tokenise); keep < 1 on small machines
    object_store_limit_mb: int = 100  # Ray Data object-store budget: bounds the bytes in flight
    block_size_kb: int = 256  # Ray Data target block size: the granularity of backpressure (small rows -> small blocks)
    no_progress_timeout_s: float = 60.0  # turn a resource deadlock into an error instead of a silent hang
    status_every_s: float = 10.0  # period of the one-line status print
    max_restarts: int = 2  # restarts of a dead scorer/labeler actor process (-1 = unbounded, Ray Data's own default)
    max_task_retries: int = -1  # re-runs of a batch whose actor died or is unreachable, on the restarted actor (-1 = unbounded, Ray Data's default; every failed attempt counts, so a finite value can run out during one node loss while the actor is unreachable; max_restarts still bounds a batch that kills its actor)
    map_max_retries: int = 3  # re-runs of a read/map/write task whose worker died (-1 = unbounded, Ray Data's default)


@dataclass
class HttpJudgeConfig:
    """Settings for an OpenAI-compatible /v1/chat/completions judge (labeler.kind=http)."""

    base_url: str = "http://127.0.0.1:8000/v1"  # endpoint root; "/chat/completions" is appended
    model: str = ""  # model name sent in the request; "" = JudgeConfig.model
    api_key_env: str = ""  # NAME of the env var holding the API key ("" = no auth); keys are never read from config
    qps: float = 4.0  # max requests started per second, over all threads of one labeler replica
    max_concurrency: int = 8  # requests in flight at once per labeler replica
    timeout_s: float = 600.0  # httpx timeout per connect/read/write, not per whole answer (judges think for minutes)
    max_retries: int = 5  # retries per request after 429 / 5xx / timeout / connection error (0 = no retry)
    backoff_s: float = 1.0  # first retry delay; doubles each retry (a Retry-After header wins when larger)
    max_backoff_s: float = 60.0  # cap on one retry delay


@dataclass
class JudgeConfig:
    """One judge: which model, how it samples, how its output is parsed, cached and retried."""

    judge_id: str = "qwq-32b"  # stable name of the judge; part of the cache key and of label_source
    model: str = "Qwen/QwQ-32B"  # HF id or local dir (vllm), or "smollm2-135m" (model/import_gguf.py); default request model name (http)
    prompt_version: str = JUDGE_PROMPT_VERSION  # part of the cache key; bump with any prompt change
    temperature: float = 0.5  # METHOD §7; use 0.0 (greedy) when benchmarking the judge itself
    top_p: float = 0.95
    max_tokens: int = 8192  # new tokens per critique (thinking included); clamped to the context left
    seed: int = 0  # base seed; each (row, attempt) draws its own seed from it and the cache key
    guided: bool = False  # constrain the critique to the tag grammar (vLLM structured outputs)
    guided_max_analysis_chars: Optional[int] = None  # bound on each <analysis_j> body when guided (None = none)
    # xgrammar (vLLM's "auto" choice for a regex) expands a bounded body {0,n} into n states per analysis: SmolLM2
    # generated 4 x 128 guided tokens 8.4x slower than with llguidance on 2 cores (docs/OPERATIONS.md).
    guided_backend: str = "guidance"  # vLLM structured-outputs backend of the judge engine (vllm judge; a server sets its own)
    reasoning_parser: str = ""  # vLLM reasoning parser ("deepseek_r1" for QwQ): guidance starts after </think>
    strict: bool = False  # a conclusion naming another paragraph than the last analysis is INVALID
    max_attempts: int = 1  # judge calls per row while the parse fails (paper: one sample per trajectory)
    tensor_parallel_size: int = 1  # GPUs per vLLM engine (QwQ-32B in bf16: 2 or 4)
    dtype: str = "auto"  # vLLM dtype; "float32" on CPU
    max_model_len: Optional[int] = None  # vLLM context length (None = the model's)
    gpu_memory_utilization: float = 0.9  # vLLM share of GPU memory for weights + KV cache
    enforce_eager: bool = False  # skip CUDA graphs (required on CPU; faster start-up for short runs)
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM arguments, passed as given
    cache_path: Optional[str] = None  # label cache folder, part of the run ledger (None = no cache; runs default to <run dir>/ledger/labels)
    sep: str = DEFAULT_SEP  # PRM step separator, removed from the text before judging (as for the PRM input)
    http: HttpJudgeConfig = field(default_factory=HttpJudgeConfig)


@dataclass
class LabelerConfig:
    kind: str = "oracle"  # oracle (reveal the pool's labels) | vllm (engine per labeler actor) | http (endpoint)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class BudgetConfig:
    max_labels: Optional[int] = None  # hard cap on labels (judge calls that were granted); None = unlimited
    max_judge_tokens: Optional[int] = None  # hard cap on generated judge tokens


@dataclass
class ClusterConfig:
    """The hardware a profile is sized for; only `jobs/active_train.py --dry_run` reads it (nothing is reserved)."""

    gpu_memory_gb: float = 80.0  # memory of one GPU in GiB, nvidia-smi's memory.total / 1024 (H100/A100 80GB: 79.6, H200: 140, A100 40GB: 39.4, L40S: 44.4); the dry run checks each GPU role's estimate against it
    num_gpus: Optional[int] = None  # GPUs in the whole cluster, checked by the dry run against trainer + scorer + judge GPUs (None = not checked)


@dataclass
class RunConfig:
    name: str = "default"  # one plain directory name (letters, digits, . _ -); a second run with the same name resumes
    output_dir: str = "~/actprm_results"  # parent of run directories; the default outlives the process and the cluster (as Ray Train's ~/ray_results); a relative path is taken from the launch directory, and refused in a `ray job submit` working-dir copy (deleted with the cluster)
    seed: int = 0
    ray_num_cpus: Optional[int] = None  # CPUs for that local instance (None = all)
    allow_external_paths: bool = False  # let configured output paths (labeler.judge.cache_path) lie outside the run dir


@dataclass
class TrackingConfig:
    """Experiment tracking, opt-in (actprm_ray/tracking.py, docs/TRACKING.md); both need `pip install -e '.[tracking]'`."""

    tensorboard: bool = False  # write TensorBoard events to <run dir>/tensorboard (loss, lr, rows/s, version, label rate, trust %, lag)
    mlflow: bool = False  # log the same to an MLflow run, the resolved config as its params and summary.json as an artifact
    mlflow_tracking_uri: Optional[str] = None  # None = a local file store at <run dir>/mlruns (no server); else any MLflow tracking URI
    experiment: str = "actprm"  # MLflow experiment name (created if missing)


@dataclass
class EvalConfig:
    """jobs/evaluate.py (METHOD §9). Rows per forward: pipeline.score_batch_size; the Ray scorer runs
    pipeline.score_actors actors of pipeline.score_num_cpus CPUs and pipeline.score_num_gpus GPUs (bf16 on GPUs)."""

    checkpoint: str = ""  # EnsemblePRM or Qwen2.5-Math-PRM-style directory, or "tiny" / "tiny_qwen_prm" (test models built on the fly); "" = the smoke run: "tiny" on 20 rows per subset unless eval.limit is set
    kind: str = "auto"  # checkpoint kind; auto = detect it from config.json
    benchmarks: List[str] = field(default_factory=lambda: ["processbench"])  # any of processbench, prmbench, first_error
    format: Optional[str] = None  # dataset format of first_error (eval/first_error.py FORMATS, e.g. big_bench_mistake)
    data: Optional[str] = None  # data path of a single benchmark (None = its folder under $ACTPRM_SHARED_DATA or ../shared/data)
    limit: Optional[int] = None  # N samples per subset/category, spread over the file (first-error sets keep correct/erroneous rows in proportion); None = all
    out: str = ""  # output directory; "" = <run dir>/eval-<time>
    max_tokens: int = MAX_EVAL_TOKENS  # rows longer than this many tokens are reported unscorable, never truncated; 0 = no cap
    tau: float = 0.5  # first-error threshold τ (recorded; PRMBench always uses µ > 0.5)
    sweep_on: Optional[str] = None  # subset to fit a τ sweep on, reported apart from the τ headline (first-error protocol only)
    scorer: str = "local"  # local: in this process; ray: the filter's Ray Data stages, Canonicalize -> Score (EnsemblePRM only; parallel on a cluster)
    device: Optional[str] = None  # torch device of the local scorer (None = cuda if available, else cpu)
    system_prompt: Optional[str] = None  # replaces the checkpoint's system prompt (None = the checkpoint's)


@dataclass
class GenerateConfig:
    """jobs/generate.py: policy rollouts (METHOD §8) under model.system_prompt, on Ray (ray.data.llm, one vLLM
    engine per Ray actor), written per shard and resumable (actprm_ray/generate/). The defaults are the laptop
    run: a random tiny policy on 16 GSM8K problems, on CPU; conf/generate_7b.yaml is the paper's policy on a GPU."""

    model: str = "tiny"  # policy: HF id, local dir, an import_gguf name ("smollm2-135m"), or "tiny" (a random tiny policy, built beside out_dir)
    policy_id: str = "tiny-random"  # short name written into `source` as "rollout:<policy_id>"
    problems_path: str = ""  # JSONL with a "question" (or "problem") field per line; "" = problems/gsm8k/train.jsonl under $ACTPRM_SHARED_DATA or ../shared/data
    out_dir: str = ""  # output folder, a pool: shard-NNNNN.parquet per finished shard, with _shards/ (completion records), _summary.json and _config.yaml; a rerun skips finished shards; "" = <run dir>/rollouts
    limit: Optional[int] = 16  # first N problems only (None = all)
    shard_size: int = 256  # problems per output shard: the unit written at once and skipped on a rerun
    samples_per_problem: int = 1  # trajectories per problem (paper stage 1: one)
    temperature: float = 0.5
    top_p: float = 1.0
    max_tokens: int = 256  # new tokens per completion; clamped to the context left after the prompt
    seed: int = 0  # base seed; each problem draws its own from it and its id
    tensor_parallel_size: int = 1  # GPUs per vLLM engine
    dtype: str = "float32"  # vLLM dtype ("auto" = the checkpoint's; float32 on CPU)
    max_model_len: Optional[int] = 1024  # vLLM context length (None = the model's)
    gpu_memory_utilization: float = 0.9  # vLLM share of GPU memory for weights + KV cache
    enforce_eager: bool = True  # skip CUDA graphs (required on CPU; faster start-up for short runs)
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra vLLM engine arguments, passed as given
    engines: int = 1  # vLLM engine replicas (Ray actors; each takes tensor_parallel_size GPUs, or 1 CPU without GPUs)
    batch_size: int = 8  # requests per engine call; 8 calls in flight per engine (ray.data.llm max_concurrent_batches)
    no_progress_timeout_s: float = 600.0  # Ray Data stall guard; the engine start and a batch's generation count as no progress (-1 = off)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    labeler: LabelerConfig = field(default_factory=LabelerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


class ConfigError(ValueError):
    pass


_CHOICES = {
    "model.init": ("normal", "truncated"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "selection.mode": ("active", "all", "random", "none"),
    "loss.bce": ("pooled", "per_trajectory"),
    "loss.regularizer": ("element_mean", "per_head_sum"),
    "train.publish": ("full", "heads"),
    "train.parallel_strategy": ("ddp", "fsdp"),
    "labeler.kind": ("oracle", "vllm", "http"),
    "labeler.judge.guided_backend": ("guidance", "xgrammar"),  # outlines: the bounded regex took 19 GB to compile
    "data.synthetic_mix": ("default", "addsub"),  # data.synthetic.MIXES (kept equal by tests/test_config.py)
    "eval.kind": ("auto", "ensemble", "qwen_prm"),
    "eval.scorer": ("local", "ray"),
}


# A run name becomes a directory, a Ray actor name and a Ray Train run name: one plain path component.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Config keys naming files a run writes; relative values are resolved against the run directory.
OUTPUT_PATH_KEYS = ("labeler.judge.cache_path",)
DEFAULT_LABEL_CACHE = "ledger/labels"  # inside the run ledger (actprm_ray/ledger.py)


def shared_data_dir() -> Path:
    """The benchmarks' and problems' data folder: $ACTPRM_SHARED_DATA, or ../shared/data next to the repo."""
    env = os.environ.get("ACTPRM_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def run_directory(cfg: Config) -> Path:
    """The run's directory, absolute: `~` expanded, a relative run.output_dir taken from the working directory."""
    return Path(os.path.normpath(Path(cfg.run.output_dir).expanduser().absolute() / cfg.run.name))


def in_job_working_dir(path: Path) -> bool:
    """Is `path` inside Ray's copy of a submitted job's working dir (deleted with the cluster)?"""
    return "working_dir_files" in path.parts and "runtime_resources" in path.parts


def resolve_output_path(value: str, directory: str | Path) -> Path:
    """`value` taken relative to `directory` (an absolute value stays itself), normalised lexically.

    Relative to the run directory, not the working directory: Ray workers do not share the driver's."""
    return Path(os.path.normpath(Path(directory).absolute() / value))


def _path_errors(cfg: Config) -> list[str]:
    """run.name is one plain name; configured output paths stay inside the run directory unless allowed."""
    if not _RUN_NAME.fullmatch(cfg.run.name):
        return [f"run.name={cfg.run.name!r}: must be one plain name (letters, digits, '.', '_', '-', starting with a "
                "letter or digit; no '/' or '..')"]
    errors = []
    if not Path(cfg.run.output_dir).expanduser().is_absolute() and in_job_working_dir(Path.cwd()):
        errors.append(f"run.output_dir={cfg.run.output_dir!r} is relative, and this job runs in Ray's temporary copy "
                      f"of its working dir ({Path.cwd()}), which is deleted with the cluster: give an absolute path "
                      "on storage that outlives it, or leave the default (~/actprm_results)")
    if cfg.run.allow_external_paths:
        return errors
    base = run_directory(cfg)
    for key in OUTPUT_PATH_KEYS:
        value = reduce(getattr, key.split("."), cfg)
        if value and base not in resolve_output_path(value, base).parents:
            errors.append(f"{key}={value!r} lies outside the run directory {base}: use a path inside it, or set "
                          "run.allow_external_paths=true")
    return errors


def _secret_errors(cfg: Config) -> list[str]:
    """API keys come only from the environment; these messages never echo the offending value."""
    h = cfg.labeler.judge.http
    errors = []
    if h.api_key_env and not _ENV_NAME.fullmatch(h.api_key_env):
        errors.append("labeler.judge.http.api_key_env must be the NAME of an environment variable (letters, digits, "
                      "'_'), not the key itself")
    url = urlsplit(h.base_url)
    if url.username or url.password:
        errors.append("labeler.judge.http.base_url carries credentials: put the key in the environment variable "
                      "named by labeler.judge.http.api_key_env")
    return errors


def _tracking_package_errors(cfg: Config) -> list[str]:
    """A backend switched on without its package (looked for, not imported)."""
    from importlib.util import find_spec

    t, errors = cfg.tracking, []
    for on, key, module in ((t.tensorboard, "tracking.tensorboard", "tensorboard"),
                            (t.mlflow, "tracking.mlflow", "mlflow")):
        if on and find_spec(module) is None:
            errors.append(f"{key}=true needs the {module} package, which the base install leaves out: "
                          f"{TRACKING_INSTALL_HINT}")
    return errors


def _eval_errors(e: EvalConfig) -> list[str]:
    """The evaluate job's rules: known benchmarks, and the keys that only make sense with some of them."""
    errors = [f"eval.benchmarks: {b!r} is not a benchmark; choose from {', '.join(EVAL_BENCHMARKS)}"
              for b in e.benchmarks if b not in EVAL_BENCHMARKS]
    if not e.benchmarks:
        errors.append(f"eval.benchmarks is empty: name one or more of {', '.join(EVAL_BENCHMARKS)}")
    if "first_error" in e.benchmarks and e.format not in FIRST_ERROR_FORMATS:
        errors.append(f"eval.format={e.format!r}: eval.benchmarks has first_error, which needs one of "
                      f"{', '.join(sorted(FIRST_ERROR_FORMATS))}")
    if e.data is not None and len(e.benchmarks) > 1:
        errors.append("eval.data applies to one benchmark; run them separately to point each at its own data")
    if e.sweep_on and e.benchmarks == ["prmbench"]:
        errors.append("eval.sweep_on applies to the first-error protocol (processbench, first_error), not prmbench")
    if e.limit is not None and e.limit < 1:
        errors.append(f"eval.limit={e.limit}: must be >= 1, or null (all)")
    if e.max_tokens < 0:
        errors.append(f"eval.max_tokens={e.max_tokens}: must be >= 0 (0 = no cap)")
    return errors


def _generate_errors(g: GenerateConfig) -> list[str]:
    errors = [f"generate.{name}={getattr(g, name)}: must be >= 1"
              for name in ("samples_per_problem", "max_tokens", "tensor_parallel_size", "shard_size", "engines",
                           "batch_size") if getattr(g, name) < 1]
    if g.no_progress_timeout_s <= 0 and g.no_progress_timeout_s != -1:
        errors.append(f"generate.no_progress_timeout_s={g.no_progress_timeout_s}: must be > 0, or -1 (off)")
    if g.limit is not None and g.limit < 1:
        errors.append(f"generate.limit={g.limit}: must be >= 1, or null (all)")
    if g.max_model_len is not None and g.max_model_len < 2:
        errors.append(f"generate.max_model_len={g.max_model_len}: must be >= 2 (a prompt token and one to generate), "
                      "or null (the model's)")
    if g.temperature < 0:
        errors.append(f"generate.temperature={g.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < g.top_p <= 1:
        errors.append(f"generate.top_p={g.top_p}: must be in (0, 1]")
    if not 0 < g.gpu_memory_utilization <= 1:
        errors.append(f"generate.gpu_memory_utilization={g.gpu_memory_utilization}: must be in (0, 1]")
    if not g.model.strip():
        errors.append("generate.model is empty: an HF id, a local dir, an import_gguf name, or \"tiny\"")
    if not g.policy_id.strip():
        errors.append("generate.policy_id is empty: rows carry it as source \"rollout:<policy_id>\"")
    if "://" in g.out_dir:
        errors.append(f"generate.out_dir={g.out_dir}: must be a local (or mounted shared) folder, not a URI")
    return errors


def validate(cfg: Config) -> Config:
    """Semantic checks OmegaConf cannot express; every problem is reported in one ConfigError."""
    from omegaconf import OmegaConf

    errors = []
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value not in choices:
            errors.append(f"{key}={value!r}: choose one of {', '.join(choices)}")
    s = cfg.selection
    if not 0.5 <= s.delta_pred <= 1.0:
        errors.append(f"selection.delta_pred={s.delta_pred}: must lie in [0.5, 1]")
    if s.delta_std < 0:
        errors.append(f"selection.delta_std={s.delta_std}: must be >= 0")
    if not 0.0 <= s.random_rate <= 1.0:
        errors.append(f"selection.random_rate={s.random_rate}: must lie in [0, 1]")
    if not 0.0 <= s.audit_rate <= 1.0:
        errors.append(f"selection.audit_rate={s.audit_rate}: must lie in [0, 1]")
    if s.target_rate is not None:
        if not 0.0 < s.target_rate <= 1.0:
            errors.append(f"selection.target_rate={s.target_rate}: must lie in (0, 1]")
        if s.audit_rate <= 0.0:
            errors.append("selection.target_rate needs selection.audit_rate > 0: the controller's guard against "
                          "trusting a wrong model reads the audited accuracy")
        if s.inline:
            errors.append("selection.target_rate works with the streaming scorer, not selection.inline=true")
    if cfg.model.n_heads < 1:
        errors.append(f"model.n_heads={cfg.model.n_heads}: must be >= 1")
    if cfg.model.max_length < 8:
        errors.append(f"model.max_length={cfg.model.max_length}: must be >= 8")
    if not 0.0 < cfg.loss.p_keep <= 1.0:
        errors.append(f"loss.p_keep={cfg.loss.p_keep}: must lie in (0, 1]")
    t = cfg.train
    for name in ("micro_batch_size", "grad_accum", "num_workers", "publish_every", "checkpoint_every"):
        if getattr(t, name) < 1:
            errors.append(f"train.{name}={getattr(t, name)}: must be >= 1")
    if t.replay < 0:
        errors.append(f"train.replay={t.replay}: must be >= 0 (0 = every labelled row is trained once)")
    if t.replay_buffer_rows < 1:
        errors.append(f"train.replay_buffer_rows={t.replay_buffer_rows}: must be >= 1")
    if t.use_gpu and t.gpus_per_worker <= 0:
        errors.append("train.use_gpu=true needs train.gpus_per_worker > 0")
    if cfg.labeler.kind in ("vllm", "http") and not (cfg.labeler.judge.model and cfg.labeler.judge.judge_id):
        errors.append(f"labeler.kind={cfg.labeler.kind} needs labeler.judge.model and labeler.judge.judge_id")
    if cfg.labeler.kind == "http" and not cfg.labeler.judge.http.base_url:
        errors.append("labeler.kind=http needs labeler.judge.http.base_url")
    errors += _path_errors(cfg) + _secret_errors(cfg)
    if t.checkpoints_to_keep < 1:
        errors.append(f"train.checkpoints_to_keep={t.checkpoints_to_keep}: must be >= 1")
    if cfg.pipeline.score_batch_size < 1:
        errors.append(f"pipeline.score_batch_size={cfg.pipeline.score_batch_size}: must be >= 1")
    for name in ("max_restarts", "max_task_retries", "map_max_retries"):
        if getattr(cfg.pipeline, name) < -1:
            errors.append(f"pipeline.{name}={getattr(cfg.pipeline, name)}: must be >= 0, or -1 for unbounded")
    if cfg.labeler.judge.max_attempts < 1:
        errors.append(f"labeler.judge.max_attempts={cfg.labeler.judge.max_attempts}: must be >= 1")
    for name in ("max_labels", "max_judge_tokens"):
        v = getattr(cfg.budget, name)
        if v is not None and v < 0:
            errors.append(f"budget.{name}={v}: must be >= 0")
    if cfg.cluster.gpu_memory_gb <= 0:
        errors.append(f"cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb}: must be > 0")
    if cfg.cluster.num_gpus is not None and cfg.cluster.num_gpus < 0:
        errors.append(f"cluster.num_gpus={cfg.cluster.num_gpus}: must be >= 0, or null (not checked)")
    if (cfg.tracking.tensorboard or cfg.tracking.mlflow) and not cfg.tracking.experiment:
        errors.append("tracking.experiment must not be empty")
    errors += _tracking_package_errors(cfg)
    errors += _eval_errors(cfg.eval) + _generate_errors(cfg.generate)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotlist overrides (`selection.delta_pred=0.9`), validated, as a Config object."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like a.b=c, got: {' '.join(bad)}")
            layers.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        # OmegaConf names the key (full_key) and the reason; keep just that.
        raise ConfigError(f"invalid config: {getattr(e, 'full_key', '') or '?'}: {str(e).splitlines()[0]}") from None
    cfg: Config = OmegaConf.to_object(merged)
    return validate(cfg)


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "default.yaml"


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_resolved(cfg: Config, directory: str | Path) -> Path:
    """Write the resolved config next to a run's outputs."""
    path = Path(directory) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path
