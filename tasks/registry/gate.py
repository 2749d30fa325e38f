"""The gate stage: promote the candidate only when it beats the champion.

Candidate and champion are judged on the same validation images (the content-hash split,
so a champion trained on older data never sees its own training images), each with its
own preprocessing and threshold. The candidate's scores and threshold are evaluate's
(reports/scores.csv, reports/operating-point.json); the champion is scored here once and
its scores reused while neither it nor the validation images change. Every rule is recorded with its
numbers and pass/fail in reports/gate.json. With no usable champion only the absolute
floors apply. When the primary metric has saturated (no candidate could beat the champion's
by min_delta) log loss decides instead, and a rejection that failed only on it is a tie.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.dataset import LabeledImage, labels_of, require_split
from tasks.durable import sha256_of, write_json, write_stage_report
from tasks.errors import FanaoiError
from tasks.inference.metrics import KEY_METRICS, image_metrics, log_losses, verdicts
from tasks.inference.model_file import ModelFileError, read_model_metadata
from tasks.inference.predictor import score_file
from tasks.inference.scores import cached_scores, read_operating_point, read_scores
from tasks.params import GateParams, Params
from tasks.registry.champion import read_champion
from tasks.registry.decisions import decision_entry, record_decision
from tasks.registry.store import MODEL_SHA256, utc_now

log = logging.getLogger(__name__)

STAGE_REPORT = "gate.json"
# Metric differences smaller than this are float noise, not a change.
_EPSILON = 1e-9


def _rule(name: str, passed: bool, text: str, **numbers: Any) -> dict[str, Any]:
    verdict = "pass" if passed else "FAIL"
    return {"rule": name, "passed": bool(passed), **numbers, "text": f"{text}: {verdict}"}


def _upper(metrics: dict[str, Any]) -> str:
    upper = metrics.get("escape_rate_upper95")
    return "" if upper is None else f" (95 % upper {upper:.4f})"


def floor_rules(candidate: dict[str, Any], gate: GateParams) -> list[dict[str, Any]]:
    """Absolute floors, checked on every run."""
    accuracy, escape = candidate["accuracy"], candidate["escape_rate"]
    return [
        _rule("min_accuracy", accuracy >= gate.min_accuracy - _EPSILON,
              f"accuracy {accuracy:.4f} >= floor {gate.min_accuracy:.4f}",
              value=accuracy, limit=gate.min_accuracy),
        _rule("max_escape_rate", escape <= gate.max_escape_rate + _EPSILON,
              f"escape rate {escape:.4f}{_upper(candidate)} <= ceiling {gate.max_escape_rate:.4f}",
              value=escape, limit=gate.max_escape_rate, upper95=candidate.get("escape_rate_upper95")),
    ]


def defect_type_rules(candidate: dict[str, Any], gate: GateParams) -> list[dict[str, Any]]:
    """With gate.max_escape_rate_per_type set: a ceiling on each defect type in validation.

    A model can pass the overall ceiling while letting one rare defect type through.
    """
    ceiling = gate.max_escape_rate_per_type
    if ceiling is None:
        return []
    return [
        _rule("max_escape_rate_per_type", row["escape_rate"] <= ceiling + _EPSILON,
              f"{kind} escape rate {row['escape_rate']:.4f} ({row['escapes']} of {row['count']}, "
              f"95 % upper {row['escape_rate_upper95']:.4f}) <= ceiling {ceiling:.4f}",
              defect_type=kind, value=row["escape_rate"], limit=ceiling, count=row["count"],
              escapes=row["escapes"], upper95=row["escape_rate_upper95"])
        for kind, row in candidate.get("defect_types", {}).items()
    ]


# Every primary metric (accuracy, balanced_accuracy, f1, auc) tops out at 1.
CEILING = 1.0
# What decides once the primary metric saturates. Log loss rather than the Brier score: it is the
# loss the models are trained on (history.csv's val_loss, clipped alike), and it still tells confident
# models apart where squared errors vanish (a GO part at 0.99 vs 0.999: Brier 1e-4 vs 1e-6, log loss
# 0.010 vs 0.001); a confident mistake, the near-escape a line fears, costs it the most.
LOSS = "log_loss"
# Rules a candidate can fail at the ceiling while holding the primary metric and every guard: a tie
# that is only not better calibrated, no sign that retraining went wrong.
TIE_RULES = frozenset({"log_loss", "loss_test"})


def saturated(champion: dict[str, Any], gate: GateParams) -> bool:
    """No candidate can beat the champion's primary metric by gate.min_delta: it is too near the ceiling."""
    return CEILING - (champion[gate.metric] or 0.0) < gate.min_delta - _EPSILON


def primary_rule(candidate: dict[str, Any], champion: dict[str, Any], gate: GateParams) -> dict[str, Any]:
    """The primary metric must improve by min_delta; saturated, it need only hold within min_delta."""
    metric, at_ceiling = gate.metric, saturated(champion, gate)
    delta = (candidate[metric] or 0.0) - (champion[metric] or 0.0)
    limit = -gate.min_delta if at_ceiling else gate.min_delta
    how = (f"saturated (no room above the champion for min_delta {gate.min_delta:.4f}), a tie: "
           f"{delta:+.4f} >= {limit:+.4f}" if at_ceiling else f"{delta:+.4f} >= min_delta {gate.min_delta:.4f}")
    return _rule("primary_metric", delta >= limit - _EPSILON,
                 f"{metric} {candidate[metric]:.4f} vs champion {champion[metric]:.4f}: {how}",
                 metric=metric, candidate=candidate[metric], champion=champion[metric],
                 delta=delta, limit=limit, saturated=at_ceiling)


def loss_rule(candidate: dict[str, Any], champion: dict[str, Any], gate: GateParams) -> dict[str, Any]:
    """At the ceiling: the candidate's log loss at least gate.min_loss_improvement (a share) below the champion's."""
    ours, theirs = candidate[LOSS], champion[LOSS]
    improvement = 1 - ours / theirs if theirs else 0.0
    needed = gate.min_loss_improvement
    how = (f"{improvement:.1%} lower >= min_loss_improvement {needed:.1%}" if improvement >= 0
           else f"{-improvement:.1%} higher, not min_loss_improvement {needed:.1%} lower")
    return _rule(LOSS, improvement >= needed - _EPSILON,
                 f"at the ceiling log loss decides: {ours:.4f} vs champion {theirs:.4f}: {how}",
                 candidate=ours, champion=theirs, improvement=improvement, limit=gate.min_loss_improvement)


def comparison_rules(
    candidate: dict[str, Any], champion: dict[str, Any], gate: GateParams
) -> list[dict[str, Any]]:
    """The primary metric must improve (saturated: hold, and log loss fall); escapes and overkills may not grow."""
    rules = [primary_rule(candidate, champion, gate)]
    if saturated(champion, gate):
        rules.append(loss_rule(candidate, champion, gate))
    for name, tolerance in (("escape_rate", gate.max_escape_increase),
                            ("overkill_rate", gate.max_overkill_increase)):
        increase = candidate[name] - champion[name]
        rules.append(_rule(
            f"max_{name.removesuffix('_rate')}_increase", increase <= tolerance + _EPSILON,
            f"{name.replace('_', ' ')} {candidate[name]:.4f} vs champion {champion[name]:.4f}: "
            f"{increase:+.4f} <= {tolerance:.4f}",
            candidate=candidate[name], champion=champion[name], increase=increase, limit=tolerance,
        ))
    return rules


def mcnemar_exact(
    candidate_correct: Sequence[bool], champion_correct: Sequence[bool]
) -> dict[str, Any]:
    """Paired exact McNemar test: two-sided binomial test on the discordant pairs."""
    candidate_correct = np.asarray(candidate_correct, dtype=bool)
    champion_correct = np.asarray(champion_correct, dtype=bool)
    candidate_only = int(np.sum(candidate_correct & ~champion_correct))
    champion_only = int(np.sum(~candidate_correct & champion_correct))
    discordant = candidate_only + champion_only
    tail = sum(math.comb(discordant, i) for i in range(min(candidate_only, champion_only) + 1))
    p_value = min(1.0, 2 * tail / 2**discordant) if discordant else 1.0
    return {
        "candidate_only_correct": candidate_only,
        "champion_only_correct": champion_only,
        "discordant": discordant,
        "p_value": p_value,
    }


def mcnemar_rule(test: dict[str, Any], significance: float) -> dict[str, Any]:
    better = test["candidate_only_correct"] > test["champion_only_correct"]
    return _rule(
        "mcnemar", better and test["p_value"] <= significance,
        f"McNemar: candidate alone right on {test['candidate_only_correct']}, champion alone "
        f"on {test['champion_only_correct']}, p = {test['p_value']:.4g} <= {significance:g}",
        **test, limit=significance,
    )


def paired_loss_test(
    labels: np.ndarray, candidate_probabilities: np.ndarray, champion_probabilities: np.ndarray
) -> dict[str, Any]:
    """One-sided Wilcoxon signed-rank test that the candidate's per-image log losses are the lower.

    Paired on the same images, and on the sizes of the differences, not only their signs: at the
    ceiling most images differ by a hair either way, and a sign test would count those as votes.
    """
    from scipy.stats import wilcoxon

    differences = log_losses(labels, champion_probabilities) - log_losses(labels, candidate_probabilities)
    changed = differences[differences != 0]  # equal losses (both clipped sure) say nothing either way
    p_value = float(wilcoxon(changed, alternative="greater").pvalue) if len(changed) else 1.0
    return {"candidate_lower": int(np.sum(changed > 0)), "champion_lower": int(np.sum(changed < 0)),
            "p_value": p_value}


def loss_test_rule(test: dict[str, Any], significance: float) -> dict[str, Any]:
    return _rule(
        "loss_test", test["p_value"] <= significance,
        f"Wilcoxon on per-image log loss: candidate lower on {test['candidate_lower']}, champion on "
        f"{test['champion_lower']}, p = {test['p_value']:.4g} <= {significance:g}",
        **test, limit=significance,
    )


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    gate: GateParams,
    mcnemar: dict[str, Any] | None = None,
    loss_test: dict[str, Any] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The pure decision on metric dicts: ("promote" | "reject", every rule checked).

    With gate.significance set the paired test is McNemar's, or at the ceiling, where neither model
    can be right more often, ``loss_test`` (``paired_loss_test``).
    """
    rules = floor_rules(candidate, gate) + defect_type_rules(candidate, gate)
    if champion is not None:
        rules += comparison_rules(candidate, champion, gate)
        test, rule = (loss_test, loss_test_rule) if saturated(champion, gate) else (mcnemar, mcnemar_rule)
        if gate.significance is not None and test is not None:
            rules.append(rule(test, gate.significance))
    return ("promote" if all(r["passed"] for r in rules) else "reject"), rules


def saturation(rules: Sequence[dict[str, Any]], gate: GateParams) -> dict[str, Any]:
    """Whether the primary metric had saturated, the metric that decided, and whether a rejection was a
    tie at the ceiling (it failed only the log loss rules): not a failed night (decisions.reject_streak)."""
    at_ceiling = any(rule.get("saturated") for rule in rules)
    failed = {rule["rule"] for rule in rules if not rule["passed"]}
    return {"saturated": at_ceiling, "deciding_metric": LOSS if at_ceiling else gate.metric,
            "tie": bool(failed) and failed <= TIE_RULES}


def score_champion(
    registry_dir: Path, images: Sequence[LabeledImage], class_mapping: dict[str, int], batch_size: int,
    cache_dir: Path | str | None,
) -> dict[str, Any]:
    """The champion's numbers on ``images``, or why it cannot be scored (status none | unusable | ok).

    Its probabilities are reused from ``cache_dir`` while the champion and the images are
    the same (tasks.inference.scores.cached_scores).
    """
    champion = read_champion(registry_dir)
    if champion is None:
        return {"status": "none", "version": None}
    try:
        if champion.problem:
            raise ModelFileError(champion.problem)
        mapping = read_model_metadata(champion.model_path)["class_mapping"]
        if mapping != class_mapping:
            raise ModelFileError(
                f"{champion.model_path}: its class mapping {mapping} differs from data.classes "
                f"{class_mapping}, so the two cannot be compared")
        model_sha256 = champion.card.get(MODEL_SHA256) or sha256_of(champion.model_path)
        probabilities, cached = cached_scores(
            model_sha256, images, cache_dir, lambda: score_file(champion.model_path, images, batch_size))
    except ModelFileError as exc:
        log.warning("champion unusable: %s", exc)
        return {"status": "unusable", "version": champion.version, "problem": str(exc)}
    threshold = float(champion.card["threshold"])
    return {
        "status": "ok", "version": champion.version, "threshold": threshold, "scores_cached": cached,
        "metrics": image_metrics(images, probabilities, threshold),
        "probabilities": probabilities,
    }


def _champion_reasons(champion: dict[str, Any]) -> list[str]:
    if champion["status"] == "none":
        return ["no champion yet: first run, judged on the floors only"]
    if champion["status"] == "unusable":
        return [
            f"champion {champion['version'] or '(no card)'} is unusable ({champion['problem']}); "
            f"judged on the floors only: it is replaced only if the floors pass"
        ]
    return [f"champion {champion['version']} scored on the same validation images"]


def _saturation_reasons(ceiling: dict[str, Any], gate: GateParams) -> list[str]:
    if not ceiling["saturated"]:
        return []
    lines = [f"{gate.metric} has saturated: no candidate can beat the champion's by min_delta "
             f"{gate.min_delta:g}, so log loss decides (at least {gate.min_loss_improvement:.0%} lower, "
             f"{gate.metric} held within min_delta); the guards still apply"]
    if ceiling["tie"]:
        lines.append("a tie at the ceiling, not a worse candidate: not counted in the reject streak")
    return lines


def gate_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of gate.json, the stage's DVC metric; the rest is in gate-details.json."""
    keys = dict.fromkeys((result["metric"], *KEY_METRICS, LOSS))
    models = {"candidate": result["candidate"]["metrics"], "champion": result["champion"].get("metrics")}
    return {
        "decision": result["decision"], "promote": int(result["decision"] == "promote"),
        "saturated": int(result["saturated"]), "deciding_metric": result["deciding_metric"],
        "failed_rules": len(result["failed"]), "validation_images": result["validation_images"],
        **{name: {key: metrics[key] for key in keys} for name, metrics in models.items() if metrics},
    }


def run_gate(
    params: Params,
    candidate_path: Path | str | None = None,
    reports_dir: Path | str | None = None,
    report: Callable[[str], None] = log.info,
    record: bool = True,
    *,
    report_file: str = STAGE_REPORT,
) -> dict[str, Any]:
    """The gate stage: writes ``reports_dir/report_file``; with ``record`` a rejection is logged.

    ``report_file`` stays gate.json for the stage (a DVC metric: its numbers; the whole
    record goes to gate-details.json); a decision that must change nothing (``fanaoi gate
    --no-publish``) writes the whole record to a file of its own.

    Returns {"decision", "reasons", "failed", "rules", "candidate", "champion", "saturated",
    "deciding_metric", "tie", ...};
    ``smoke`` holds a few validation images with the candidate's probabilities for the
    publish smoke test.
    """
    candidate_path, reports_dir = params.paths.chosen(candidate_path, reports_dir)
    mapping = read_model_metadata(candidate_path)["class_mapping"]
    if mapping != params.data.class_mapping:
        raise FanaoiError(
            f"{candidate_path}: trained with class mapping {mapping} but data.classes gives "
            f"{params.data.class_mapping}; retrain with `fanaoi train`"
        )
    point = read_operating_point(reports_dir, sha256_of(candidate_path), candidate_path)
    images, probabilities = read_scores(reports_dir, "validation")
    require_split(images, "validation", params.data.dir)
    labels = np.asarray(labels_of(images))
    gate = params.gate
    threshold = point["threshold"]
    review_band = tuple(point["review_band"]) if point["review_band"] else None
    candidate = image_metrics(images, probabilities, threshold, review_band)
    champion = score_champion(Path(params.registry.dir), images, params.data.class_mapping,
                              params.evaluate.batch_size, params.validate.cache_dir)
    mcnemar = loss_test = None
    if champion["status"] == "ok":
        theirs = champion.pop("probabilities")  # per image: too long for the report
        mcnemar = mcnemar_exact(verdicts(probabilities, threshold) == labels,
                                verdicts(theirs, champion["threshold"]) == labels)
        loss_test = paired_loss_test(labels, probabilities, theirs)
    decision, rules = decide(candidate, champion.get("metrics"), gate, mcnemar, loss_test)
    ceiling = saturation(rules, gate)
    result = {
        "decision": decision,
        "time": utc_now(),
        "metric": gate.metric,
        **ceiling,
        "threshold": threshold,
        "threshold_source": point["source"],
        "review_band": list(review_band) if review_band else None,
        "reasons": _champion_reasons(champion) + _saturation_reasons(ceiling, gate) + [r["text"] for r in rules],
        "failed": [r["text"] for r in rules if not r["passed"]],
        "rules": rules,
        "candidate": {"path": str(candidate_path), "history": str(reports_dir / "history.csv"), "metrics": candidate},
        "champion": champion,
        "mcnemar": mcnemar,
        "loss_test": loss_test,
        "validation_images": len(images),
        "smoke": [{"path": str(image.path), "probability": float(p)}
                  for image, p in zip(images[: gate.smoke_images], probabilities, strict=False)],
    }
    if report_file == STAGE_REPORT:
        write_stage_report(reports_dir / report_file, result, gate_metrics(result))
    else:  # a preview: no DVC metric to keep small, the whole record in one file
        write_json(reports_dir / report_file, result)
    why = "; ".join(result["failed"]) or "every rule passes"
    report(f"gate: {decision} {candidate_path}: {why}")
    if record and decision == "reject":
        record_decision(params.registry, decision_entry(
            "reject", result, version=None, previous=champion["version"], reasons=result["reasons"]
        ))
    return result
