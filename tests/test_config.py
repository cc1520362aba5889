"""Config: METHOD defaults, YAML + dotlist layering, errors that name the key, the resolved dump."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest

from actprm_ray.config import Config, ConfigError, load_config, save_resolved, to_dict, validate

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_method():
    cfg = load_config()
    assert cfg.model.trust_remote_code is False  # remote code stays off unless asked for
    assert cfg.model.n_heads == 32 and cfg.model.head_hidden == 128
    assert cfg.model.sep == "<extra_0>"
    assert cfg.model.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."
    assert cfg.model.max_length == 2048
    assert cfg.model.init == "normal"
    assert (cfg.selection.delta_pred, cfg.selection.delta_std, cfg.selection.step_threshold) == (0.95, 0.005, 0.5)
    assert cfg.selection.mode == "active" and cfg.selection.unbiased_std is False
    assert (cfg.loss.bce, cfg.loss.regularizer, cfg.loss.reg_lambda, cfg.loss.p_keep) == (
        "pooled", "element_mean", 0.5, 1.0)
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay, cfg.train.grad_clip) == (1e-5, 500, 0.0, 1.0)


def test_dotlist_overrides_with_types():
    cfg = load_config(None, ["selection.delta_pred=0.9", "model.n_heads=8", "selection.mode=all",
                             "model.trust_remote_code=true"])
    assert cfg.selection.delta_pred == 0.9 and isinstance(cfg.selection.delta_pred, float)
    assert cfg.model.n_heads == 8 and isinstance(cfg.model.n_heads, int)
    assert cfg.selection.mode == "all"
    assert cfg.model.trust_remote_code is True


def test_aleatoric_only_ablation_value_parses():
    assert math.isinf(load_config(None, ["selection.delta_std=.inf"]).selection.delta_std)


def test_yaml_then_dotlist_layering(tmp_path):
    path = write(tmp_path, "selection:\n  delta_pred: 0.9\n  delta_std: 0.01\nmodel:\n  n_heads: 4\n")
    cfg = load_config(path, ["selection.delta_pred=0.97"])
    assert cfg.selection.delta_pred == 0.97  # the command line wins over the file
    assert cfg.selection.delta_std == 0.01  # the file wins over the default
    assert cfg.model.n_heads == 4
    assert cfg.loss.reg_lambda == 0.5  # untouched default


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["selection.nope=1"], "selection.nope"),
        (["nope.x=1"], "nope"),
        (["labeler.judge.tempreature=0.2"], "labeler.judge.tempreature"),
        (["eval.chekpoint=x"], "eval.chekpoint"),
        (["generate.modle=x"], "generate.modle"),
    ],
)
def test_unknown_key_is_named(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value)


def test_unknown_key_in_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"selection\.delta_prd"):
        load_config(write(tmp_path, "selection:\n  delta_prd: 0.9\n"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["selection.delta_pred=abc"], "selection.delta_pred"),
        (["model.n_heads=3.5"], "model.n_heads"),
        (["model.trust_remote_code=maybe"], "model.trust_remote_code"),
        (["train.micro_batch_size=[1,2]"], "train.micro_batch_size"),
    ],
)
def test_wrong_type_is_named(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value)


def test_wrong_type_in_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.n_heads"):
        load_config(write(tmp_path, "model:\n  n_heads: many\n"))


def test_semantic_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["selection.mode=topk", "model.n_heads=0", "selection.delta_pred=0.3", "loss.bce=mean"])
    msg = str(err.value)
    for key in ("selection.mode", "model.n_heads", "selection.delta_pred", "loss.bce"):
        assert key in msg


def test_validate_catches_direct_edits():
    cfg = Config()
    cfg.selection.random_rate = 1.5
    with pytest.raises(ConfigError, match=r"selection\.random_rate"):
        validate(cfg)


def test_http_labeler_needs_endpoint():
    with pytest.raises(ConfigError, match=r"labeler\.judge\.http\.base_url"):
        load_config(None, ["labeler.kind=http", "labeler.judge.judge_id=j", "labeler.judge.http.base_url="])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="a.b=c"):
        load_config(None, ["selection.delta_pred"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_evaluate_and_generate_read_the_one_tree():
    """The evaluate and generate jobs' settings are sections of Config: --config file, then a.b=c overrides."""
    cfg = load_config(REPO / "conf" / "eval_7b.yaml", ["eval.checkpoint=/ckpt", "eval.benchmarks=[processbench]",
                                                       "pipeline.score_batch_size=8"])
    assert (cfg.eval.checkpoint, cfg.eval.benchmarks, cfg.eval.scorer) == ("/ckpt", ["processbench"], "ray")
    assert (cfg.pipeline.score_actors, cfg.pipeline.score_num_gpus, cfg.pipeline.score_batch_size) == (8, 1.0, 8)
    gen = load_config(REPO / "conf" / "generate_7b.yaml", ["generate.limit=4"])
    assert (gen.generate.model, gen.generate.limit, gen.generate.max_model_len) == ("Qwen/Qwen2.5-Math-7B-Instruct", 4, None)
    assert load_config().generate.model == "tiny"  # the embedded default runs on a laptop


def test_evaluate_and_generate_errors_are_reported_with_the_rest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.benchmarks=[first_error,prmbench]", "eval.data=x", "eval.max_tokens=-1",
                           "generate.samples_per_problem=0", "model.n_heads=0", "eval.scorer=remote"])
    msg = str(err.value)
    for key in ("eval.format", "eval.data", "eval.max_tokens", "generate.samples_per_problem", "model.n_heads",
                "eval.scorer"):
        assert key in msg


def test_resolved_config_dump_round_trips(tmp_path):
    cfg = load_config(None, ["selection.delta_pred=0.9", "model.n_heads=4", "data.limit=10"])
    path = save_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    text = path.read_text()
    assert "delta_pred: 0.9" in text and "n_heads: 4" in text
    reloaded = load_config(path)
    assert asdict(reloaded) == asdict(cfg)
    assert to_dict(reloaded) == to_dict(cfg)
    assert reloaded != load_config()  # the overrides really were written


# Every shipped YAML must load against the schema (empty until conf/ has files).
@pytest.mark.parametrize("path", sorted((REPO / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_validates(path):
    load_config(path)


def test_run_directory_is_absolute_and_a_relative_one_is_refused_in_a_job_working_dir(tmp_path, monkeypatch):
    from actprm_ray.config import ConfigError, load_config, run_directory

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert run_directory(load_config(None, ["run.name=r"])) == tmp_path / "home" / "actprm_results" / "r"
    monkeypatch.chdir(tmp_path)
    assert run_directory(load_config(None, ["run.output_dir=runs", "run.name=r"])) == tmp_path / "runs" / "r"
    job_copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    with pytest.raises(ConfigError, match=r"run\.output_dir='runs' is relative.*deleted with the cluster"):
        load_config(None, ["run.output_dir=runs"])
    assert run_directory(load_config(None, [f"run.output_dir={tmp_path / 'abs'}", "run.name=r"])) == tmp_path / "abs" / "r"


def test_synthetic_mix_names_are_the_mixes_and_the_pool_uses_the_chosen_one(tmp_path):
    """config.py lists the mix names without importing data/ (no package cycle); they must stay MIXES' keys."""
    from actprm_ray.config import _CHOICES, ConfigError, load_config
    from actprm_ray.data.shards import resolve_pool
    from actprm_ray.data.synthetic import MIXES

    assert set(_CHOICES["data.synthetic_mix"]) == set(MIXES)
    with pytest.raises(ConfigError, match=r"data\.synthetic_mix='mul': choose one of"):
        load_config(None, ["data.synthetic_mix=mul"])
    import pyarrow.parquet as pq

    cfg = load_config(None, ["data.synthetic_rows=200", "data.synthetic_mix=addsub"])
    rows = pq.read_table(resolve_pool(cfg, tmp_path)).to_pylist()
    # addsub: 2 to 5 steps, and correct solutions only add and subtract (a wrong operator may be any); the default
    # mix multiplies and divides too.
    assert all(2 <= len(r["steps"]) <= 5 for r in rows)
    assert not any(op in s for r in rows if r["first_error_step"] == -1 for s in r["steps"] for op in (" * ", " / "))
    default = pq.read_table(resolve_pool(load_config(None, ["data.synthetic_rows=200"]), tmp_path)).to_pylist()
    assert default != rows


def test_names_the_schema_owns_match_the_code_that_implements_them():
    """config.py imports no other package of ours (no import cycle through the schema), so it spells these out."""
    from actprm_ray.config import EVAL_BENCHMARKS, FIRST_ERROR_FORMATS, JUDGE_PROMPT_VERSION, load_config
    from actprm_ray.eval.first_error import FORMATS
    from actprm_ray.eval.runner import BENCHMARKS
    from actprm_ray.label.prompt import PROMPT_VERSION

    assert set(FIRST_ERROR_FORMATS) == set(FORMATS)
    assert BENCHMARKS == EVAL_BENCHMARKS
    assert load_config(None, []).labeler.judge.prompt_version == JUDGE_PROMPT_VERSION == PROMPT_VERSION
