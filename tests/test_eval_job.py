"""Scorers on tiny checkpoints and the evaluate job end to end on slices of the real benchmark files."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from actprm_ray.data.step_format import DEFAULT_SYSTEM_PROMPT, encode_trajectory
from actprm_ray.eval import metrics as M
from actprm_ray.eval.qwen_prm import HEAD_KEYS, QwenPRM, build_tiny_qwen_prm, is_qwen_prm_checkpoint
from actprm_ray.eval.scorers import build_local_scorer, build_tiny_checkpoint, checkpoint_kind
from script_loader import load_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

ROWS = [
    {"id": "short", "question": "What is 2 + 3?", "steps": ["Add 2 and 3.", "The answer is 5."]},
    {"id": "long", "question": "Tom has 12 apples and buys 30 more. He gives away 7. How many are left?",
     "steps": ["He starts with 12 apples.", "Buying 30 more gives 12 + 30 = 42.",
               "Giving away 7 leaves 42 - 7 = 35.\n\nSo 35 apples are left.", "The answer is 35."]},
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval_ckpts")
    return {"qwen_prm": build_tiny_checkpoint("tiny_qwen_prm", work), "ensemble": build_tiny_checkpoint("tiny", work)}


def test_checkpoint_kinds_are_detected(ckpts, tmp_path):
    assert checkpoint_kind(ckpts["qwen_prm"]) == "qwen_prm" and is_qwen_prm_checkpoint(ckpts["qwen_prm"])
    assert checkpoint_kind(ckpts["ensemble"]) == "ensemble" and not is_qwen_prm_checkpoint(ckpts["ensemble"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither an EnsemblePRM"):
        checkpoint_kind(tmp_path)


def test_qwen_prm_matches_a_by_hand_forward(ckpts):
    """µ = softmax(W2 relu(W1 h + b1) + b2)[1] at each <extra_0>, with h from the plain backbone, recomputed here
    from the raw safetensors tensors; and the config's remote-code auto_map is never needed."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    d = ckpts["qwen_prm"]
    assert "auto_map" in json.loads((d / "config.json").read_text())
    scorer = build_local_scorer(d, device="cpu")
    got = scorer(ROWS, batch_size=2).mus

    tok = AutoTokenizer.from_pretrained(d)
    backbone = AutoModel.from_pretrained(d).eval()
    w = load_file(d / "model.safetensors")
    for row, mus in zip(ROWS, got):
        enc = encode_trajectory(tok, row["question"], row["steps"], sep="<extra_0>", system_prompt=DEFAULT_SYSTEM_PROMPT)
        with torch.no_grad():
            h = backbone(input_ids=torch.tensor([enc.input_ids])).last_hidden_state[0, enc.readout_positions]
            hidden = torch.relu(h @ w["score.0.weight"].T + w["score.0.bias"])
            p = torch.softmax(hidden @ w["score.2.weight"].T + w["score.2.bias"], dim=-1)[:, 1]
        assert len(mus) == len(row["steps"])
        assert mus == pytest.approx(p.tolist(), abs=1e-5)
    # The random head is meant to give spread-out probabilities, so this test can tell heads apart.
    assert max(max(m) for m in got) - min(min(m) for m in got) > 1e-3


@pytest.mark.parametrize("kind", ["qwen_prm", "ensemble"])
def test_scores_do_not_depend_on_batch_padding(ckpts, kind):
    scorer = build_local_scorer(ckpts[kind], device="cpu")
    alone = scorer([ROWS[0]], batch_size=2).mus[0]
    batched = scorer([ROWS[1], ROWS[0]], batch_size=2).mus[1]  # padded to the long row's length
    assert batched == pytest.approx(alone, abs=1e-5)
    assert all(0.0 < m < 1.0 for m in alone)


def test_ensemble_scorer_agrees_with_score_trajectories(ckpts):
    from actprm_ray.model.ensemble_prm import EnsemblePRM
    from actprm_ray.model.scoring import score_trajectories

    scorer = build_local_scorer(ckpts["ensemble"], device="cpu")
    model = EnsemblePRM.from_pretrained(ckpts["ensemble"]).eval()
    ref = score_trajectories(model, model.tokenizer, ROWS, sep="<extra_0>", system_prompt=DEFAULT_SYSTEM_PROMPT, batch_size=1)
    assert scorer(ROWS, batch_size=2).mus == [pytest.approx(r["step_mean"], abs=1e-6) for r in ref]


def test_qwen_prm_scores_through_the_one_scoring_function(ckpts):
    """QwenPRM has EnsemblePRM's score(batch) -> (µ, σ), σ = 0, so score_encoded serves it, packing included."""
    from actprm_ray.model.scoring import score_encoded

    model = QwenPRM.from_pretrained(ckpts["qwen_prm"]).eval()
    encoded = []
    for r in ROWS:
        e = encode_trajectory(model.tokenizer, r["question"], r["steps"], sep=model.sep, system_prompt=DEFAULT_SYSTEM_PROMPT)
        encoded.append({"input_ids": e.input_ids, "readout_positions": e.readout_positions})
    padded = score_encoded(model, encoded, batch_size=2)
    packed = score_encoded(model, encoded, pack_tokens=4096)
    assert [r["step_std"] for r in padded] == [[0.0] * len(r["steps"]) for r in ROWS]
    assert [r["step_mean"] for r in packed] == [pytest.approx(r["step_mean"], abs=1e-5) for r in padded]


def test_local_scorer_leaves_rows_over_the_token_limit_unscored(ckpts):
    """One call: rows over max_tokens come back unscored with the reason, the rest scored as if alone, and the
    batches it reports are the length-sorted batches of the kept rows, as indices into the call's rows."""
    scorer = build_local_scorer(ckpts["ensemble"], device="cpu")
    rows = [{"id": f"r{n}", "question": "What is 2 + 3?", "steps": ["Add 2 and 3 to get 5."] * n} for n in (1, 6, 3, 2)]
    tokens = [len(encode_trajectory(scorer.model.tokenizer, r["question"], r["steps"], sep=scorer.sep,
                                    system_prompt=scorer.system_prompt).input_ids) for r in rows]
    assert tokens[1] > tokens[2] > tokens[3] > tokens[0]  # more steps, more tokens
    out = scorer(rows, batch_size=2, max_tokens=tokens[1] - 1)
    assert out.lengths == tokens
    assert out.reasons == {1: f"{tokens[1]} tokens exceed max_tokens={tokens[1] - 1}"}
    assert out.batches == [[2, 3], [0]]  # kept rows 0, 2, 3, longest first; row 1 in none
    assert out.mus[1] is None
    for j in (0, 2, 3):
        assert out.mus[j] == pytest.approx(scorer([rows[j]], batch_size=1).mus[0], abs=1e-5)


def test_ray_scorer_batches_stay_inside_a_chunk():
    """The batches reported for the Ray scorer are each chunk's own length batches (an actor scores a chunk
    whole), whatever order the rows come back in; invalid rows carry their reason."""
    from actprm_ray.eval.ray_scorer import _chunk_rows, _scored

    # chunk 0 = rows 0-2 (lengths 5, 9, 7), chunk 1 = rows 3-5 (lengths 3, 8, 4; row 5 invalid).
    out = [{"id": str(j), "chunk": j // 3, "num_tokens": n, "valid": j != 5,
            "invalid_reason": "too long" if j == 5 else "", "step_mean": [j / 10]}
           for j, n in enumerate([5, 9, 7, 3, 8, 4])][::-1]
    got = _scored(6, out, batch_size=2)
    assert got.batches == [[1, 2], [0], [4, 3]]  # not [[1, 4], [2, 0], [3]], which would cross chunks
    assert got.lengths == [5, 9, 7, 3, 8, 4] and got.reasons == {5: "too long"}
    assert got.mus == [[0.0], [0.1], [0.2], [0.3], [0.4], None]
    # Every actor gets a chunk (10 rows over 4 actors: chunks of 3), none larger than the filter's 1,024 rows.
    assert (_chunk_rows(10, 4), _chunk_rows(10, 1), _chunk_rows(5000, 1), _chunk_rows(2, 8)) == (3, 10, 1024, 1)


def test_limit_tokens_marks_long_valid_rows_invalid():
    import numpy as np

    from actprm_ray.eval.ray_scorer import limit_tokens

    batch = {"id": np.array(["a", "b", "c"]),
             "input_ids": np.array([np.arange(3), np.arange(6), np.arange(9)], dtype=object),
             "valid": np.array([True, True, False]),
             "invalid_reason": np.array(["", "", "x"])}  # fixed-width <U1: a longer reason must not be cut
    out = limit_tokens(batch, max_tokens=5)
    assert out["num_tokens"].tolist() == [3, 6, 9]
    assert out["valid"].tolist() == [True, False, False]  # row 2 was invalid already and keeps its reason
    assert list(out["invalid_reason"]) == ["", "6 tokens exceed max_tokens=5", "x"]
    assert batch["valid"].tolist() == [True, True, False] and list(batch["invalid_reason"]) == ["", "", "x"]
    assert limit_tokens(batch, max_tokens=None)["valid"].tolist() == [True, True, False]


def test_qwen_prm_missing_head_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    d = build_tiny_qwen_prm(tmp_path / "q")
    state = load_file(d / "model.safetensors")
    del state["score.2.bias"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing head tensor\(s\) \['score.2.bias'\]"):
        QwenPRM.from_pretrained(d)
    assert "score.2.bias" in HEAD_KEYS


def _job():
    return load_script("jobs/evaluate.py")


def _run_job(out: Path, *overrides: str) -> dict:
    assert _job().main([f"eval.out={out}", *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


def _all_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_numbers(v)


def _check_scores_in_unit_interval(metrics: dict) -> None:
    for name, m in metrics["benchmarks"].items():
        scores = [m["mean_f1"]] if "mean_f1" in m else [m["overall"]["prm_score"]]
        scores += [v for sub in m.get("subsets", {}).values() for k, v in sub.items() if k in ("acc_err", "acc_cor", "f1")]
        scores += [v for c in m.get("categories", {}).values() for k, v in c.items() if k in ("f1_pos", "f1_neg", "prm_score", "score")]
        scores += list(m.get("groups", {}).values())
        assert scores and all(isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0 for x in scores), name
        pad = m["scoring"]
        assert 0.0 <= pad["padding_fraction_after_bucketing"] <= pad["padding_fraction_before_bucketing"] < 1.0
    assert all(math.isfinite(x) for x in _all_numbers(metrics))


def test_job_end_to_end_on_real_slices(ckpts, tmp_path):
    out = tmp_path / "run"
    metrics = _run_job(out, f"eval.checkpoint={ckpts['ensemble']}", "eval.benchmarks=[processbench,prmbench]",
                       "eval.limit=4", "pipeline.score_batch_size=4", "eval.sweep_on=gsm8k")
    for name in ("predictions.jsonl", "metrics.json", "report.md", "processbench_per_subset.png",
                 "processbench_threshold_curve.png", "prmbench_per_subset.png", "prmbench_threshold_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    _check_scores_in_unit_interval(metrics)
    pb, prm = metrics["benchmarks"]["processbench"], metrics["benchmarks"]["prmbench"]
    assert pb["data"]["stats"]["samples"] == 16 and prm["data"]["stats"]["samples"] == 40
    assert set(pb["sweep"]["f1_other_subsets"]) == {"math", "olympiadbench", "omnimath"}

    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert len(rows) == 16 + 40
    for r in rows:
        if r["benchmark"] == "processbench":
            # The stored prediction is the protocol applied to the stored µ.
            assert r["pred"] == M.first_error_prediction(r["step_mu"], 0.5)
        else:
            assert r["valid"] == [m > 0.5 for m in r["step_mu"]] and len(r["valid"]) == len(r["step_mu"])
    report = (out / "report.md").read_text()
    assert "| ActPRM | .816 |" in report and "**this run**" in report and "Partial run" in report
    # The resolved config beside the outputs reloads to the same config.
    from actprm_ray.config import load_config

    saved = load_config(out / "config.yaml")
    assert (saved.eval.checkpoint, saved.eval.out, saved.eval.limit) == (str(ckpts["ensemble"]), str(out), 4)


def test_job_first_error_format_with_qwen_prm(ckpts, tmp_path):
    out = tmp_path / "fe"
    metrics = _run_job(out, f"eval.checkpoint={ckpts['qwen_prm']}", "eval.benchmarks=[first_error]",
                       "eval.format=champ_fws", "eval.limit=6")
    m = metrics["benchmarks"]["first_error:champ_fws"]
    assert m["subsets"]["champ_fws"]["n"] == 6 and m["subsets"]["champ_fws"]["n_cor"] >= 1
    assert metrics["meta"]["kind"] == "qwen_prm"
    _check_scores_in_unit_interval(metrics)
    assert (out / "first_error_champ_fws_threshold_curve.png").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["eval.benchmarks=[first_error]"], r"eval\.format=None: eval\.benchmarks has first_error, which needs one of"),
    (["eval.benchmarks=[processbench,prmbench]", "eval.data=x"], r"eval\.data applies to one benchmark"),
    (["eval.benchmarks=[processbench,mmlu]"], r"eval\.benchmarks: 'mmlu' is not a benchmark"),
    (["eval.chekpoint=x"], r"eval\.chekpoint"),  # an unknown key is named
    (["checkpoint"], r"a\.b=c"),  # an override must look like a.b=c
])
def test_job_rejects_bad_arguments(tmp_path, overrides, message):
    from actprm_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _run_job(tmp_path, *overrides)
    assert not (tmp_path / "config.yaml").exists()  # refused before anything is written


def test_job_refuses_the_old_flags(tmp_path, capsys):
    """The evaluate job's pre-config-tree flags are refused with a usage error, not ignored."""
    with pytest.raises(SystemExit) as e:
        _run_job(tmp_path, "--checkpoint", "x")
    assert e.value.code == 2 and "unknown flags: --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_smoke_run_defaults(monkeypatch, tmp_path):
    """No arguments: the tiny checkpoint on 20 rows per subset, written under the run directory."""
    from actprm_ray.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _job().resolve(load_config())
    assert (cfg.eval.checkpoint, cfg.eval.limit) == ("tiny", 20)
    assert Path(cfg.eval.out).parent == tmp_path / "actprm_results" / "default"
    assert _job().resolve(load_config(None, ["eval.limit=3"])).eval.limit == 3
    real = _job().resolve(load_config(None, ["eval.checkpoint=/ckpt"]))
    assert (real.eval.checkpoint, real.eval.limit) == ("/ckpt", None)  # a real checkpoint: every row


@pytest.mark.ray
@pytest.mark.slow  # ~70 s on the shared 2-core box: two actor stages each load the model
def test_ray_data_scorer_matches_local_scorer(ckpts, ray_local):
    """The filter's Ray Data stages give the same µ as the in-process scorer, row for row (order restored)."""
    from actprm_ray.eval.batching import score_rows
    from actprm_ray.eval.ray_scorer import RayDataScorer

    ray_scorer = RayDataScorer(ckpts["ensemble"], batch_size=2)
    # The filter's stages, with evaluation's token limit between them.
    assert ray_scorer.plan().stage_names() == ["canonicalize", "limit_tokens", "score"]
    rows = ROWS + [{"id": "third", "question": "Is 7 prime?", "steps": ["7 has no divisors but 1 and 7.", "Yes."]}]
    local_scorer = build_local_scorer(ckpts["ensemble"], device="cpu")
    tokens = [len(encode_trajectory(local_scorer.model.tokenizer, r["question"], r["steps"], sep=local_scorer.sep,
                                    system_prompt=local_scorer.system_prompt).input_ids) for r in rows]
    limit = max(tokens) - 1  # the longest row is over the limit: unscored, with the same reason on both paths
    via_ray = score_rows(rows, ray_scorer, batch_size=2, max_tokens=limit)
    local = score_rows(rows, local_scorer, batch_size=2, max_tokens=limit)
    assert via_ray.mus == [pytest.approx(m, abs=1e-5) if m is not None else None for m in local.mus]
    assert via_ray.unscorable == local.unscorable and len(local.unscorable) == 1
    assert via_ray.padding_after == local.padding_after  # same token lengths, same bucketing (one chunk)


def test_report_row_follows_the_paper_columns():
    from actprm_ray.eval.report import markdown_report, our_row
    from actprm_ray.eval.runner import BenchmarkResult

    scoring = {"rows_scored": 1, "steps_scored": 1, "wall_s": 1.0, "rows_per_s": 1.0, "unscorable": 0,
               "padding_fraction_before_bucketing": 0.5, "padding_fraction_after_bucketing": 0.1, "padding_length_unit": "tokens"}
    data = {"stats": {"samples": 1}, "skipped_rows": 0}
    sub = lambda f1: {"acc_err": f1, "acc_cor": f1, "f1": f1, "n_err": 1, "n_cor": 1}  # noqa: E731
    pb = BenchmarkResult("processbench", [], {"tau": 0.5, "mean_f1": 0.25, "scoring": scoring, "data": data, "subsets": {
        "gsm8k": sub(0.1), "math": sub(0.2), "olympiadbench": sub(0.3), "omnimath": sub(0.4)}})
    prm = BenchmarkResult("prmbench", [], {"tau": 0.5, "scoring": scoring, "data": data, "categories": {},
                                           "overall": {"prm_score": 0.9},
                                           "groups": {"simplicity": 0.6, "soundness": 0.7, "sensitivity": 0.8}})
    assert our_row({"processbench": pb}) == [0.1, 0.2, 0.3, 0.4, 0.25, None, None, None, None]
    assert our_row({"prmbench": prm})[4:] == [None, 0.6, 0.7, 0.8, 0.9]
    md = markdown_report({"processbench": pb, "prmbench": prm}, {"checkpoint_name": "ck", "tau": 0.5})
    assert "| **this run** (ck) | .100 | .200 | .300 | .400 | .250 | .600 | .700 | .800 | .900 |" in md
