"""train/step.micro_step with inline selection (Ray-free): the rows it trusts carry their pseudo-label checked
against the oracle's, as the scorer's trusted rows do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actprm_ray.config import load_config
from actprm_ray.data.step_format import DEFAULT_SEP, DEFAULT_SYSTEM_PROMPT
from actprm_ray.data.synthetic import generate_pool
from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig
from actprm_ray.pipeline.stages import CanonicalizeStage
from actprm_ray.select import pseudo_labels
from actprm_ray.train.step import inline_labels, micro_step


def _model_and_rows(backbone_dir, tmp_path) -> tuple[EnsemblePRM, list[dict]]:
    """A fresh 4-head PRM and 8 synthetic rows canonicalised as the loop's stage does (oracle labels included)."""
    init = EnsemblePRM.from_backbone(backbone_dir, PRMConfig(n_heads=4, init_seed=0)).save_pretrained(
        tmp_path / "init")
    model = EnsemblePRM.from_pretrained(init)
    pool = generate_pool(8, seed=1)
    batch = CanonicalizeStage(str(init), sep=DEFAULT_SEP, system_prompt=DEFAULT_SYSTEM_PROMPT, max_length=512)(
        {k: np.asarray([r[k] for r in pool], dtype=object) for k in ("id", "question", "steps", "first_error_step")})
    rows = [{k: batch[k][i] for k in batch} for i in range(len(pool))]
    return model, rows


def test_inline_trusted_rows_carry_their_pseudo_label_check(tiny_backbone_dir, tmp_path):
    model, rows = _model_and_rows(tiny_backbone_dir, tmp_path)
    # δ_pred 0.5 and δ_std inf switch both tests off: every row is trusted, none trained.
    cfg = load_config(None, ["selection.inline=true", "selection.delta_pred=0.5", "selection.delta_std=.inf"])
    result = micro_step(model, model, rows, cfg)
    assert result.selected == [False] * len(rows)
    # The expected checks, from µ scored apart (the heads' µ does not depend on the batch in fp32, to rounding).
    with torch.no_grad():
        from actprm_ray.model.scoring import score_encoded

        scores = score_encoded(model, rows, batch_size=1)
    expected = [int(pseudo_labels(s["step_mean"]) == inline_labels(int(r["oracle_first_error_step"]),
                                                                 len(s["step_mean"])))
                for s, r in zip(scores, rows)]
    assert result.pseudo_label_correct == expected
    assert set(expected) == {0, 1}  # both kinds occur, so the comparison means something

    trained = micro_step(model, model, rows, load_config(None, ["selection.inline=true", "selection.delta_pred=0.99",
                                                                "selection.delta_std=0.0"]))
    assert trained.selected == [True] * len(rows) and trained.pseudo_label_correct == [-1] * len(rows)


def test_replayed_rows_are_all_trained_on_the_labels_they_carry(tiny_backbone_dir, tmp_path):
    """train.replay: a replayed row was selected once; under inline selection it is trained again whatever the
    ensemble now thinks, on the labels stored with it (train/replay.replay_row), not re-derived."""
    from actprm_ray.train.replay import replay_row

    model, rows = _model_and_rows(tiny_backbone_dir, tmp_path)
    stored = [replay_row(r, inline=True) for r in rows]
    assert [list(s["hard_labels"]) for s in stored] == [
        inline_labels(int(r["oracle_first_error_step"]), len(r["readout_positions"])) for r in rows]
    assert any(0 in s["hard_labels"] for s in stored)  # some rows carry an error label

    # Relabel every row "all steps correct": a replay must train on these, not on the oracle's.
    relabelled = [{**s, "hard_labels": [1] * len(s["readout_positions"])} for s in stored]
    trust_all = load_config(None, ["selection.inline=true", "selection.delta_pred=0.5", "selection.delta_std=.inf"])
    replayed = micro_step(model, model, relabelled, trust_all, replayed=True)
    assert replayed.selected == [True] * len(rows) and not replayed.empty_selection
    judge_path = micro_step(model, model, relabelled, load_config(None, []))  # no inline: the stored labels
    assert replayed.loss == pytest.approx(judge_path.loss, rel=1e-5)
    oracle_path = micro_step(model, model, stored, load_config(None, []))
    assert abs(oracle_path.loss - replayed.loss) > 1e-4  # the labels matter, so the comparison above means something
