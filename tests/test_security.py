"""Security properties: remote code off unless asked (and loud when on), safetensors-only weights, a judge
parser that never evaluates what it reads, API keys only from the environment (checked end to end through
the label job), and config paths that cannot write outside the run directory unless allowed."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import sys
import types
import uuid
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from fake_judge import INCORRECT_AT_2, FakeJudge

from actprm_ray.config import ConfigError, load_config, resolve_output_path, to_yaml
from actprm_ray.label.cache import LabelCache
from actprm_ray.label.judge import Generation, JudgeConfig, JudgeLabeler
from actprm_ray.label.parse import parse_judge_output

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "ACTPRM_SECURITY_TEST_KEY"
MARKER = f"sk-marker-{uuid.uuid4().hex}"
# Set at import, i.e. before any test starts Ray: Ray's workers inherit the environment Ray was started with,
# and an API key must reach them that way (never through the config or a runtime_env, which Ray stores).
os.environ[KEY_ENV] = MARKER


# ---- remote code ----------------------------------------------------------------------------------------------


def _spy_trust_remote_code(monkeypatch) -> list:
    import transformers

    seen = []
    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def wrapped(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", wrapped)
    return seen


@pytest.mark.parametrize("enabled", [False, True])
def test_remote_code_only_when_configured_and_loudly(monkeypatch, caplog, tiny_backbone_dir, tmp_path, enabled):
    """The run's model load (jobs/active_train.py) passes model.trust_remote_code through, default off."""
    from actprm_ray.drivers.active import prepare_initial_model

    overrides = [f"model.backbone={tiny_backbone_dir}", "model.n_heads=2"]
    if enabled:
        overrides.append("model.trust_remote_code=true")
    cfg = load_config(None, overrides)
    seen = _spy_trust_remote_code(monkeypatch)
    with caplog.at_level(logging.WARNING):
        prepare_initial_model(cfg, tmp_path)
    assert seen == [("AutoTokenizer", enabled), ("AutoModel", enabled)]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "trust_remote_code=True" in r.message]
    assert bool(loud) == enabled


@pytest.mark.parametrize("engine_kwargs", [{}, {"trust_remote_code": True}])
def test_the_vllm_judge_gets_remote_code_only_from_engine_kwargs(monkeypatch, caplog, engine_kwargs):
    from actprm_ray.label import vllm_judge

    built = {}
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM = lambda **kwargs: built.update(kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)  # no engine is started: only its arguments are checked
    monkeypatch.setattr(vllm_judge, "_on_cpu", lambda: False)
    with caplog.at_level(logging.WARNING):
        vllm_judge.VLLMJudgeLabeler._build_engine(JudgeConfig(model="some/judge", engine_kwargs=engine_kwargs))
    assert built.get("trust_remote_code", False) is bool(engine_kwargs)  # vLLM's own default is off
    assert ("trust_remote_code=True" in caplog.text) is bool(engine_kwargs)


# ---- safetensors only -----------------------------------------------------------------------------------------


def test_a_backbone_with_pickle_weights_only_is_refused(tiny_backbone_dir, tmp_path):
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone_dir, backbone)
    (backbone / "model.safetensors").rename(backbone / "pytorch_model.bin")  # stands in for a torch.save file
    with pytest.raises(ValueError, match=r"refusing to load .*pytorch_model\.bin.*convert them to safetensors"):
        EnsemblePRM.from_backbone(backbone, PRMConfig(n_heads=1))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "optimizer.pkl"])
def test_checkpoints_with_pickle_files_are_refused_by_every_loader(tiny_backbone_dir, tmp_path, name):
    """EnsemblePRM and Qwen-PRM checkpoints (jobs/evaluate.py): a pickle file anywhere in the directory is refused
    before any file is read. (Saving writes safetensors only: tests/test_model.py checks the layout.)"""
    from actprm_ray.eval.qwen_prm import QwenPRM
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    ckpt = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=1)).save_pretrained(tmp_path / "ckpt")
    (ckpt / name).write_bytes(b"\x80\x04never unpickled")
    for load in (EnsemblePRM.from_pretrained, QwenPRM.from_pretrained):
        with pytest.raises(ValueError, match=rf"refusing to load .*{name}.*safetensors"):
            load(ckpt)


# ---- the judge parser never evaluates -------------------------------------------------------------------------


def _payloads(marker: Path) -> list[str]:
    cmd = f"touch {marker}"
    return [
        f"__import__('os').system('{cmd}')",
        f"<conclusion>__import__('os').system('{cmd}')</conclusion>",
        f"<analysis_1>{{exec(\"import os; os.system('{cmd}')\")}}</analysis_1>"
        f"<conclusion>Incorrect: paragraph eval('1+1')</conclusion>",
        f"<think>{{{{ cycler.__init__.__globals__.os.system('{cmd}') }}}}</think><conclusion>Correct</conclusion>",
        f"!!python/object/apply:os.system ['{cmd}']",
        f"<analysis_{{__import__('os').system('{cmd}')}}>x</analysis_1><conclusion>Incorrect</conclusion>",
    ]


def test_code_in_a_critique_is_read_as_text(tmp_path):
    marker = tmp_path / "executed"
    results = [parse_judge_output(p, 3) for p in _payloads(marker)]
    assert not marker.exists()
    assert [r.ok for r in results] == [False, False, True, True, False, False]
    assert results[2].first_error_step == 0 and results[3].first_error_step == -1  # the tags, nothing else
    assert "no <conclusion>" in results[0].reason and "not 'Correct'" in results[1].reason


class _Scripted(JudgeLabeler):
    def __init__(self, texts, **kw):
        super().__init__(JudgeConfig(judge_id="t", **kw))
        self.texts = texts

    def generate(self, prompts, seeds, num_steps):
        return [Generation(self.texts.pop(0), 10, 10) for _ in prompts]


def test_code_in_a_critique_becomes_a_failed_or_textual_label_and_is_cached_verbatim(tmp_path):
    marker = tmp_path / "executed"
    payloads = _payloads(marker)
    n = len(payloads)
    labeler = _Scripted(list(payloads), cache_path=str(tmp_path / "labels"))
    steps = np.empty(n, dtype=object)
    for i in range(n):
        steps[i] = ["a", "b", "c"]
    out = labeler({"id": np.arange(n), "question": np.array([f"q{i}" for i in range(n)], dtype=object),
                   "steps": steps, "selected": np.ones(n, dtype=bool)})
    assert not marker.exists()
    assert list(out["label_status"]) == ["failed", "failed", "ok", "ok", "failed", "failed"]
    stored = labeler.cache.get_many(list(out["label_key"]))
    assert sorted(e.critique for e in stored.values()) == sorted(payloads)


def test_no_dynamic_code_or_unsafe_deserialisation_in_the_label_package():
    """A guard for the future: the judge path has no eval/exec/compile, pickle, marshal or yaml.load."""
    banned_calls = {"eval", "exec", "compile", "__import__"}
    banned_modules = {"pickle", "marshal", "shelve", "dill", "cloudpickle"}
    for path in sorted((REPO / "actprm_ray" / "label").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in banned_calls, f"{path.name}:{node.lineno} calls {node.func.id}"
            if isinstance(node, ast.Attribute) and node.attr in ("load", "unsafe_load"):
                assert not (isinstance(node.value, ast.Name) and node.value.id == "yaml"), f"{path.name}:{node.lineno}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = {a.name.split(".")[0] for a in node.names} | {(getattr(node, "module", "") or "").split(".")[0]}
                assert not names & banned_modules, f"{path.name}:{node.lineno} imports {names & banned_modules}"


# ---- API keys only from the environment -----------------------------------------------------------------------


@pytest.fixture()
def echoing_judge():
    """A hostile judge that echoes the Authorization header back: in a 400 (ECHO400 rows), in a 500 that is
    retried and then given up (ECHO500), and inside an otherwise good critique (ECHO200)."""
    modes = {"ECHO400": "echo400", "ECHO500": "echo500", "ECHO200": "echo200"}
    with FakeJudge(critique=INCORRECT_AT_2, prompt_modes=modes) as srv:
        yield srv


def _texts_holding(root: Path, marker: str) -> list[str]:
    """Files under root whose bytes, or (Parquet) whose decoded cells, contain the marker."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if marker.encode() in path.read_bytes():
            hits.append(str(path))
        elif path.suffix == ".parquet" and marker in json.dumps(pads.dataset(path).to_table().to_pylist(),
                                                                default=str):
            hits.append(str(path))
    return hits


@pytest.mark.ray
def test_the_api_key_reaches_the_judge_and_nothing_we_write(ray_local, echoing_judge, tmp_path, capfd):
    """jobs/label.py's pipeline with the HTTP judge: the key comes from the environment, is sent as the bearer
    token, and is absent from the outputs, the label cache, the resolved config, the summary and the logs."""
    from actprm_ray.drivers.label_job import LabelArgs, run_label

    rows = [dict(id=f"r{i}", question=f"{tag} Ann has {i} pens and gets 4 more. How many?",
                 steps=[f"Start with {i}.", "Add 4 to get 9.", "So 9."], first_error_step=-1, selected=True)
            for i, tag in enumerate(["ECHO400", "ECHO500", "ECHO200", "plain"] * 2)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [
        "labeler.kind=http", "labeler.judge.judge_id=echo", "labeler.judge.model=echo",
        f"labeler.judge.http.base_url={echoing_judge.base_url}", f"labeler.judge.http.api_key_env={KEY_ENV}",
        "labeler.judge.http.qps=0", "labeler.judge.http.max_retries=1", "labeler.judge.http.backoff_s=0.01",
        "labeler.judge.http.timeout_s=30", "labeler.judge.cache_path=cache/judge",
        "pipeline.label_batch_size=4"])
    assert MARKER not in to_yaml(cfg)
    out = tmp_path / "out"
    summary = run_label(cfg, LabelArgs(input=str(tmp_path / "in.jsonl"), output=str(out)))

    assert set(echoing_judge.auth) == {f"Bearer {MARKER}"}  # the key did reach the judge
    # 500s after the retries are transient (a rerun asks again); 400s are permanent.
    assert (summary["status"]["ok"], summary["status"]["failed"], summary["status"]["transient"]) == (4, 2, 2)
    assert summary["judge"]["http_retries"] == 2 and summary["judge"]["http_http_500"] == 4
    assert summary["judge"]["http_http_400"] == 2 and summary["judge"]["requests"] == 8
    labelled = pads.dataset(out / "labelled", format="parquet").to_table().to_pylist()
    reasons = [r["label_reason"] for r in labelled if r["label_status"] in ("failed", "transient")]
    assert len(reasons) == 4 and all("Bearer ***" in r for r in reasons), reasons
    cache = out / "cache" / "judge"  # the relative cache path lands inside the output folder
    critiques = [e.critique for e in LabelCache(cache).all_entries() if e.critique]
    assert len(critiques) == 4 and sum("seen Bearer ***" in c for c in critiques) == 2

    assert _texts_holding(out, MARKER) == []
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    assert _texts_holding(logs, MARKER) == []
    captured = capfd.readouterr()
    assert MARKER not in captured.out and MARKER not in captured.err
    assert MARKER not in json.dumps(summary)


@pytest.mark.parametrize("override, hidden", [
    ("labeler.judge.http.api_key_env=sk-live-0123456789abcdef", "sk-live-0123456789abcdef"),
    ("labeler.judge.http.base_url=https://user:sk-live-0123456789@judge.example/v1", "sk-live-0123456789"),
])
def test_a_key_written_into_the_config_is_refused_without_being_echoed(override, hidden):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["labeler.kind=http", override])
    assert "labeler.judge.http" in str(e.value) and hidden not in str(e.value)


# ---- paths stay inside the run directory ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "", ".", "..", ".hidden", "a\\b", "two words"])
def test_run_name_must_be_one_plain_name(tmp_path, name):
    with pytest.raises(ConfigError, match=r"run\.name=.*plain name"):
        load_config(None, [f"run.output_dir={tmp_path}", f"run.name='{name}'"])


@pytest.mark.parametrize("name", ["default", "judge1", "random_s0", "v1.2-rc"])
def test_plain_run_names_are_accepted(tmp_path, name):
    assert load_config(None, [f"run.name={name}"]).run.name == name


@pytest.mark.parametrize("path, inside", [
    ("cache.sqlite", True), ("sub/dir/cache.sqlite", True), ("sub/../cache.sqlite", True), ("{run}/c.sqlite", True),
    ("../shared.sqlite", False), ("sub/../../x.sqlite", False), ("{out}/other/c.sqlite", False),
    ("/tmp/c.sqlite", False),
])
def test_output_paths_outside_the_run_dir_need_the_opt_in(tmp_path, path, inside):
    path = path.format(run=tmp_path / "runs" / "r1", out=tmp_path)
    base = [f"run.output_dir={tmp_path / 'runs'}", "run.name=r1", f"labeler.judge.cache_path={path}"]
    if inside:
        assert load_config(None, base).labeler.judge.cache_path == path
    else:
        with pytest.raises(ConfigError, match=r"labeler\.judge\.cache_path=.*outside the run directory.*"
                                              r"run\.allow_external_paths=true"):
            load_config(None, base)
    assert load_config(None, base + ["run.allow_external_paths=true"]).labeler.judge.cache_path == path


def test_relative_output_paths_resolve_against_the_run_dir_not_the_working_dir(tmp_path):
    run = tmp_path / "runs" / "r1"
    assert resolve_output_path("cache/c.sqlite", run) == run / "cache" / "c.sqlite"
    assert resolve_output_path("/data/c.sqlite", run) == Path("/data/c.sqlite")
    assert resolve_output_path("a/../c.sqlite", run) == run / "c.sqlite"


def test_every_config_error_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.name=../x", "selection.delta_pred=2", "labeler.judge.http.api_key_env=sk-1"])
    text = str(e.value)
    assert "run.name" in text and "selection.delta_pred" in text and "api_key_env" in text
