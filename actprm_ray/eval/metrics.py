"""Pure evaluation metrics (METHOD §9): plain lists in, plain numbers out. No Ray, no torch.

ProcessBench (first-error protocol), per subset:
    prediction = first i with µ_i < τ, else -1
    acc_err    = share of label != -1 rows whose prediction equals the label exactly
    acc_cor    = share of label == -1 rows predicted -1
    F1         = 2·acc_err·acc_cor / (acc_err + acc_cor), 0 if both are 0
    headline   = unweighted mean of the subset F1s

PRMBench (step-validity protocol); positive = a correct step, a step is predicted valid iff µ > 0.5:
    TP correct & valid, FN correct & invalid, TN error & invalid, FP error & valid
    F1_pos = 2TP/(2TP+FP+FN), F1_neg = 2TN/(2TN+FN+FP) (0 when the denominator is 0)
    PRMScore = (F1_pos + F1_neg) / 2, pooled over the steps of a set of samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# ---------------------------------------------------------------------------------------------------------------
# ProcessBench
# ---------------------------------------------------------------------------------------------------------------


def first_error_prediction(step_mu: list[float], tau: float = 0.5) -> int:
    """Index of the first step with µ < τ, or -1 when every step has µ ≥ τ."""
    for i, mu in enumerate(step_mu):
        if mu < tau:
            return i
    return -1


def f1_of_accuracies(acc_err: float, acc_cor: float) -> float:
    """Harmonic mean of the two accuracies; 0 when both are 0 (METHOD §9)."""
    if acc_err + acc_cor == 0:
        return 0.0
    return 2.0 * acc_err * acc_cor / (acc_err + acc_cor)


def first_error_metrics(labels: list[int], predictions: list[int]) -> dict:
    """acc_err, acc_cor, F1 and the counts behind them for one subset.

    An empty side (no erroneous or no correct rows, e.g. a small --limit slice) gets accuracy 0.0 and
    `undefined` names it, so the numbers stay finite while the report can say why F1 is 0.
    """
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    err_hits = err_total = cor_hits = cor_total = 0
    for y, p in zip(labels, predictions):
        if y == -1:
            cor_total += 1
            cor_hits += p == -1
        else:
            err_total += 1
            err_hits += p == y  # exact match only: too early, too late and -1 are all misses
    acc_err = err_hits / err_total if err_total else 0.0
    acc_cor = cor_hits / cor_total if cor_total else 0.0
    undefined = [name for name, n in (("acc_err", err_total), ("acc_cor", cor_total)) if n == 0]
    return {
        "acc_err": acc_err,
        "acc_cor": acc_cor,
        "f1": f1_of_accuracies(acc_err, acc_cor),
        "n_err": err_total,
        "n_cor": cor_total,
        "n": len(labels),
        "undefined": undefined,
    }


def processbench_summary(per_subset: dict[str, tuple[list[int], list[int]]]) -> dict:
    """{subset: (labels, predictions)} -> per-subset metrics plus the headline mean F1 (unweighted)."""
    subsets = {name: first_error_metrics(y, p) for name, (y, p) in per_subset.items()}
    mean_f1 = sum(m["f1"] for m in subsets.values()) / len(subsets) if subsets else 0.0
    return {"subsets": subsets, "mean_f1": mean_f1}


def threshold_curve(
    per_subset: dict[str, tuple[list[int], list[list[float]]]], thresholds: list[float]
) -> dict[str, list[dict]]:
    """{subset: (labels, per-row step µ)} -> {subset: [first_error_metrics at each τ]} for the sweep and plots."""
    curve: dict[str, list[dict]] = {}
    for name, (labels, mus) in per_subset.items():
        curve[name] = []
        for tau in thresholds:
            m = first_error_metrics(labels, [first_error_prediction(mu, tau) for mu in mus])
            curve[name].append({"tau": tau, **m})
    return curve


def best_threshold(points: list[dict]) -> dict:
    """The sweep point with the highest F1 (ties -> the τ closest to 0.5, then the lower τ)."""
    if not points:
        raise ValueError("empty threshold sweep")
    return max(points, key=lambda p: (p["f1"], -abs(p["tau"] - 0.5), -p["tau"]))


# ---------------------------------------------------------------------------------------------------------------
# PRMBench
# ---------------------------------------------------------------------------------------------------------------

# Short names used by the PRMBench paper, and its three groups (METHOD §9).
CATEGORY_ABBREV = {
    "redundency": "NR",
    "circular": "NCL",
    "counterfactual": "ES",
    "step_contradiction": "SC",
    "domain_inconsistency": "DC",
    "confidence": "CI",
    "missing_condition": "PS",
    "deception": "DR",
    "multi_solutions": "MS",
}
GROUPS = {
    "simplicity": ["redundency", "circular"],
    "soundness": ["counterfactual", "step_contradiction", "domain_inconsistency", "confidence"],
    "sensitivity": ["missing_condition", "deception", "multi_solutions"],
}
CORRECT_CATEGORY = "correct"
# Categories with no gold error step: F1_neg is 0 by construction, so their score is F1_pos alone.
# METHOD §9 names MS; "correct" is the same situation and is outside the overall and the groups anyway.
POSITIVE_ONLY_CATEGORIES = {"multi_solutions", CORRECT_CATEGORY}


@dataclass
class Confusion:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: "Confusion") -> "Confusion":
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)


def step_confusion(error_steps: list[int], valid: list[bool]) -> Confusion:
    """Confusion counts for one sample. `error_steps` are 1-based; entries outside 1..len(valid) are ignored."""
    errors = {j - 1 for j in error_steps if 1 <= j <= len(valid)}
    c = Confusion()
    for i, v in enumerate(valid):
        if i in errors:
            if v:
                c.fp += 1
            else:
                c.tn += 1
        elif v:
            c.tp += 1
        else:
            c.fn += 1
    return c


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def prm_scores(c: Confusion) -> dict:
    """F1_pos, F1_neg, PRMScore and the counts, for pooled confusion counts."""
    f1_pos = _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)
    f1_neg = _ratio(2 * c.tn, 2 * c.tn + c.fn + c.fp)
    return {"f1_pos": f1_pos, "f1_neg": f1_neg, "prm_score": 0.5 * f1_pos + 0.5 * f1_neg, **asdict(c)}


def step_validity(step_mu: list[float], threshold: float = 0.5) -> list[bool]:
    """PRMBench: a step is valid iff µ > threshold (strictly)."""
    return [mu > threshold for mu in step_mu]


def prmbench_summary(samples: list[tuple[str, list[int], list[bool]]]) -> dict:
    """[(category, 1-based error_steps, per-step validity)] -> overall, per-category and group scores.

    Overall pools the steps of every non-"correct" sample (the paper's "Average"); each category pools its
    own steps; `score` is PRMScore, or F1_pos for the positive-only categories; a group is the unweighted
    mean of its categories' scores (categories absent from the data are left out and listed; a group with
    none present is None).
    """
    per_cat: dict[str, Confusion] = {}
    overall = Confusion()
    for category, error_steps, valid in samples:
        c = step_confusion(error_steps, valid)
        per_cat[category] = per_cat.get(category, Confusion()) + c
        if category != CORRECT_CATEGORY:
            overall = overall + c
    categories = {}
    for name, c in sorted(per_cat.items()):
        m = prm_scores(c)
        m["score"] = m["f1_pos"] if name in POSITIVE_ONLY_CATEGORIES else m["prm_score"]
        categories[name] = m
    groups, missing = {}, []
    for g, members in GROUPS.items():
        present = [categories[c]["score"] for c in members if c in categories]
        missing += [c for c in members if c not in categories]
        groups[g] = sum(present) / len(present) if present else None
    return {"overall": prm_scores(overall), "categories": categories, "groups": groups, "missing_categories": missing}


def prmbench_threshold_curve(
    samples: list[tuple[str, list[int], list[float]]], thresholds: list[float]
) -> list[dict]:
    """Overall PRMScore and step accuracy when validity is µ > t, for each t (monitoring only)."""
    points = []
    for t in thresholds:
        c = Confusion()
        for category, error_steps, mus in samples:
            if category != CORRECT_CATEGORY:
                c = c + step_confusion(error_steps, step_validity(mus, t))
        total = c.tp + c.fp + c.tn + c.fn
        points.append({"tau": t, "prm_score": prm_scores(c)["prm_score"], "step_acc": _ratio(c.tp + c.tn, total)})
    return points
