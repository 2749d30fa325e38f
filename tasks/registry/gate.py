"""The gate stage: promote the candidate only when it beats the champion.

Candidate and champion are judged on the same validation images (the content-hash split,
so a champion trained on older data never sees its own training images), each with its
own preprocessing and threshold. The candidate's scores and threshold are evaluate's
(reports/scores.csv, reports/operating-point.json); the champion is scored here once and
its scores reused while neither it nor the validation images change. Every rule is recorded with its
numbers and pass/fail in reports/gate.json. With no usable champion only the absolute
floors apply.
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
from tasks.inference.metrics import KEY_METRICS, image_metrics, verdicts
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


def comparison_rules(
    candidate: dict[str, Any], champion: dict[str, Any], gate: GateParams
) -> list[dict[str, Any]]:
    """The primary metric must improve by min_delta; escapes and overkills may not grow."""
    metric = gate.metric
    delta = (candidate[metric] or 0.0) - (champion[metric] or 0.0)
    rules = [
        _rule("primary_metric", delta >= gate.min_delta - _EPSILON,
              f"{metric} {candidate[metric]:.4f} vs champion {champion[metric]:.4f}: "
              f"{delta:+.4f} >= min_delta {gate.min_delta:.4f}",
              metric=metric, candidate=candidate[metric], champion=champion[metric],
              delta=delta, limit=gate.min_delta),
    ]
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


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    gate: GateParams,
    mcnemar: dict[str, Any] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The pure decision on metric dicts: ("promote" | "reject", every rule checked)."""
    rules = floor_rules(candidate, gate) + defect_type_rules(candidate, gate)
    if champion is not None:
        rules += comparison_rules(candidate, champion, gate)
        if gate.significance is not None and mcnemar is not None:
            rules.append(mcnemar_rule(mcnemar, gate.significance))
    return ("promote" if all(r["passed"] for r in rules) else "reject"), rules


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


def gate_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of gate.json, the stage's DVC metric; the rest is in gate-details.json."""
    keys = dict.fromkeys((result["metric"], *KEY_METRICS))
    models = {"candidate": result["candidate"]["metrics"], "champion": result["champion"].get("metrics")}
    return {
        "decision": result["decision"], "promote": int(result["decision"] == "promote"),
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

    Returns {"decision", "reasons", "failed", "rules", "candidate", "champion", ...};
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
    mcnemar = None
    if champion["status"] == "ok":
        mcnemar = mcnemar_exact(verdicts(probabilities, threshold) == labels,
                                verdicts(champion.pop("probabilities"), champion["threshold"]) == labels)
    decision, rules = decide(candidate, champion.get("metrics"), gate, mcnemar)
    result = {
        "decision": decision,
        "time": utc_now(),
        "metric": gate.metric,
        "threshold": threshold,
        "threshold_source": point["source"],
        "review_band": list(review_band) if review_band else None,
        "reasons": _champion_reasons(champion) + [r["text"] for r in rules],
        "failed": [r["text"] for r in rules if not r["passed"]],
        "rules": rules,
        "candidate": {"path": str(candidate_path), "history": str(reports_dir / "history.csv"), "metrics": candidate},
        "champion": champion,
        "mcnemar": mcnemar,
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
