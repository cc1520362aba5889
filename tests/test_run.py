"""The run skeleton (drivers/run.py): the shared command line, and what a Run writes and cleans up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from actprm_ray.config import DEFAULT_CONFIG, load_config
from actprm_ray.pipeline import outcomes as oc
from actprm_ray.drivers.run import Run, job_parser, parse_job_args
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]


def _parser():
    p = job_parser("jobs/x.py", "A job.")
    p.add_argument("--input", default="")
    return p


def test_parse_job_args_splits_flags_config_and_overrides(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("train:\n  lr: 0.5\n")
    known, cfg = parse_job_args(_parser(), ["--input", "in", "--config", str(conf), "run.name=x"])
    assert known.input == "in" and known.config == str(conf)
    assert cfg.train.lr == 0.5 and cfg.run.name == "x"


@pytest.mark.parametrize("argv", [["--no_such_flag"], ["--inp", "x"]])  # no silent prefix matching either
def test_parse_job_args_refuses_unknown_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_job_args(_parser(), argv)
    assert e.value.code == 2 and "unknown flags" in capsys.readouterr().err


def _filter(argv):
    from actprm_ray.drivers.filter import parse_filter_args

    args, cfg = parse_filter_args(["--input", "in", *argv])
    return args.input, cfg


def _label(argv):
    from actprm_ray.drivers.label_job import parse_label_args

    args, cfg = parse_label_args(["--input", "in", "--output", "out", *argv])
    return args.input, cfg


def _train(argv):
    from actprm_ray.drivers.supervised import parse_train_args

    init, cfg = parse_train_args(["--init_checkpoint", "in", *argv])
    return init, cfg


def _job_file(name: str):
    """A jobs/*.py module, loaded by path (jobs/ is not a package)."""
    return load_script(f"jobs/{name}.py")


def _active(argv):
    known, cfg = _job_file("active_train").parse_args(["--dry_run", *argv])
    return ("in" if known.dry_run else None), cfg


def _config_only(name):
    return lambda argv: ("in", _job_file(name).parse_args(argv))  # no flags of their own


JOBS = {"jobs/filter.py": _filter, "jobs/label.py": _label, "jobs/train.py": _train, "jobs/active_train.py": _active,
        "jobs/evaluate.py": _config_only("evaluate"), "jobs/generate.py": _config_only("generate")}
DEFAULT_FILE = {"jobs/active_train.py": DEFAULT_CONFIG}  # the others start from the dataclass defaults


@pytest.mark.parametrize("prog", sorted(JOBS))
def test_every_job_reads_its_flags_then_config_then_overrides(prog, tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("run:\n  name: from_file\ntrain:\n  lr: 0.5\n")
    own, cfg = JOBS[prog](["--config", str(conf), "train.lr=0.25"])
    assert own == "in" and cfg.run.name == "from_file" and cfg.train.lr == 0.25  # the override wins over the file
    own, cfg = JOBS[prog](["selection.delta_pred=0.75"])
    default = load_config(DEFAULT_FILE.get(prog))
    assert cfg.selection.delta_pred == 0.75 and cfg.train.lr == default.train.lr and cfg.run.name == default.run.name


@pytest.mark.parametrize("prog", sorted(JOBS))
@pytest.mark.parametrize("bad", [["--no_such_flag"], ["--conf", "c.yaml"]])
def test_every_job_refuses_unknown_and_abbreviated_flags(prog, bad, capsys):
    with pytest.raises(SystemExit) as e:
        JOBS[prog](bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: {prog}" in err and "unknown flags" in err


def test_run_writes_config_outcomes_and_summary(tmp_path, capsys):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "labeler.kind=http"])
    with Run(cfg, tmp_path / "r", tag="job") as run:
        run.save_config()
        run.say("run dir here")
        # A relative cache path lies in the run directory; the config saved before keeps what was given.
        assert run.place_label_cache() == str(tmp_path / "r" / "ledger" / "labels")
        oc.write_outcome_part([oc.outcome_row("a", oc.TRAINED)], run.dir / "outcomes" / "p.parquet")
        assert run.resume_outcomes() == frozenset({"a"})
        _, counts = run.finalize_outcomes(["a", "b"])
        run.write_summary({"n": 2}, "job_summary.json")
    assert capsys.readouterr().out == "[job] run dir here\n"
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["labeler"]["judge"]["cache_path"] is None
    assert counts[oc.TRAINED] == 1 and counts[oc.NOT_REACHED] == 1
    assert oc.read_outcome_parts(tmp_path / "r" / "outcomes").num_rows == 1  # the parts stay; the table is beside
    assert (tmp_path / "r" / "outcomes.parquet").is_file()
    assert json.loads((tmp_path / "r" / "job_summary.json").read_text()) == {"n": 2}
    assert run.wall_s >= 0


def test_oracle_runs_have_no_label_cache(tmp_path):
    run = Run(load_config(None, ["labeler.kind=oracle"]), tmp_path, tag="job")
    assert run.place_label_cache() is None


@pytest.mark.ray
def test_a_failed_job_still_kills_its_coordinator(ray_local, tmp_path):
    from actprm_ray.pipeline.coordinator import coordinator_name

    name = coordinator_name("skeleton-failure")
    with pytest.raises(RuntimeError, match="the job failed"):
        with Run(load_config(), tmp_path, tag="job") as run:
            ray_local.get(run.start_coordinator(name, str(tmp_path)).budget_state.remote())
            raise RuntimeError("the job failed")
    with pytest.raises(ValueError):  # gone: a rerun under the same name can start its own
        ray_local.get_actor(name, namespace="actprm")
