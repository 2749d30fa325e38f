import json
from collections import Counter

import numpy as np
import pytest

from tasks.data.dataset import list_images, select
from tasks.inference.metrics import escape_upper_bound
from tasks.params import ParamsError, replace
from tasks.registry.decisions import read_log, reject_streak
from tasks.registry.gate import decide, mcnemar_exact, paired_loss_test, run_gate, saturation
from tasks.registry.store import CHAMPION_MODEL
from tests.conftest import BASE, copy_with_defect_types
from tests.tasks.champion_support import (
    copy_registry,
    gate_candidate,
    gate_params,
    good_model,
    one_version_registry,
    save_random_model,
    train_good_model,
)


def metrics(accuracy, escape_rate=0.0, overkill_rate=0.0, **others):
    return {
        "accuracy": accuracy, "escape_rate": escape_rate, "overkill_rate": overkill_rate,
        "balanced_accuracy": 1 - (escape_rate + overkill_rate) / 2, "f1": accuracy, "auc": accuracy,
        **others,
    }


def failed(rules):
    return [rule["rule"] for rule in rules if not rule["passed"]]


GATE = replace(BASE.gate, min_delta=0.005, max_escape_increase=0.0, max_overkill_increase=0.01,
                  min_accuracy=0.95, max_escape_rate=0.05)


def test_first_run_is_judged_on_the_floors_only():
    decision, rules = decide(metrics(0.96, escape_rate=0.04), None, GATE)
    assert decision == "promote"
    assert [rule["rule"] for rule in rules] == ["min_accuracy", "max_escape_rate"]
    decision, rules = decide(metrics(0.94, escape_rate=0.06), None, GATE)
    assert decision == "reject" and failed(rules) == ["min_accuracy", "max_escape_rate"]


def test_gain_below_min_delta_is_rejected_and_a_clear_gain_promoted():
    champion = metrics(0.960)
    decision, rules = decide(metrics(0.963), champion, GATE)
    assert decision == "reject" and failed(rules) == ["primary_metric"]
    primary = rules[2]
    assert primary["delta"] == pytest.approx(0.003) and primary["limit"] == 0.005
    assert "+0.0030 >= min_delta 0.0050: FAIL" in primary["text"]
    assert decide(metrics(0.970), champion, GATE)[0] == "promote"


def test_better_accuracy_with_more_escapes_is_rejected():
    champion = metrics(0.960, escape_rate=0.020, overkill_rate=0.060)
    candidate = metrics(0.980, escape_rate=0.030, overkill_rate=0.010)
    decision, rules = decide(candidate, champion, GATE)
    assert decision == "reject"
    assert failed(rules) == ["max_escape_increase"]
    escape = next(rule for rule in rules if rule["rule"] == "max_escape_increase")
    assert escape["increase"] == pytest.approx(0.010)


def test_overkill_may_grow_within_its_tolerance_only():
    champion = metrics(0.960, overkill_rate=0.020)
    assert decide(metrics(0.970, overkill_rate=0.030), champion, GATE)[0] == "promote"
    decision, rules = decide(metrics(0.970, overkill_rate=0.031), champion, GATE)
    assert decision == "reject" and failed(rules) == ["max_overkill_increase"]


def test_primary_metric_follows_params():
    champion = metrics(0.96, auc=0.990)
    candidate = metrics(0.99, auc=0.991)  # accuracy gains, AUC does not by min_delta
    gate = replace(BASE.gate, metric="auc", min_accuracy=0.9)
    decision, rules = decide(candidate, champion, gate)
    assert decision == "reject" and failed(rules) == ["primary_metric"]
    assert rules[2]["metric"] == "auc"


def test_mcnemar_matches_a_hand_computation():
    # 8 images only the candidate gets right, 1 only the champion, 11 both right.
    candidate = [True] * 8 + [False] + [True] * 11
    champion = [False] * 8 + [True] + [True] * 11
    test = mcnemar_exact(candidate, champion)
    assert (test["candidate_only_correct"], test["champion_only_correct"], test["discordant"]) == (8, 1, 9)
    # Two-sided exact binomial, n = 9, k = 1: 2 * (C(9,0) + C(9,1)) / 2**9 = 20 / 512.
    assert test["p_value"] == pytest.approx(20 / 512)
    champion_metrics, candidate_metrics = metrics(0.90), metrics(0.95)
    passes = decide(candidate_metrics, champion_metrics, replace(BASE.gate, significance=0.05, min_accuracy=0.9), test)
    fails = decide(candidate_metrics, champion_metrics, replace(BASE.gate, significance=0.01, min_accuracy=0.9), test)
    assert passes[0] == "promote" and fails[0] == "reject" and failed(fails[1]) == ["mcnemar"]


def test_mcnemar_never_favours_a_candidate_that_is_significantly_worse():
    test = mcnemar_exact([False] * 9 + [True], [True] * 9 + [True])
    assert test["p_value"] == pytest.approx(2 * 1 / 2**9)
    _, rules = decide(metrics(0.99), metrics(0.9), replace(BASE.gate, significance=0.05, min_accuracy=0.9), test)
    assert failed(rules) == ["mcnemar"]


def test_no_discordant_pairs_gives_p_one():
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0


# The demo night: both models perfect on validation, the candidate trained on more data.
PERFECT = metrics(1.0, log_loss=0.050)


def test_at_the_ceiling_a_better_calibrated_candidate_is_promoted_on_log_loss():
    decision, rules = decide(metrics(1.0, log_loss=0.030), PERFECT, GATE)
    assert decision == "promote"
    primary, loss = rules[2], rules[3]
    assert primary["saturated"] and primary["limit"] == -0.005
    assert "saturated" in primary["text"] and primary["text"].endswith("+0.0000 >= -0.0050: pass")
    assert (loss["rule"], loss["candidate"], loss["champion"]) == ("log_loss", 0.030, 0.050)
    assert loss["improvement"] == pytest.approx(0.4)
    assert loss["text"] == ("at the ceiling log loss decides: 0.0300 vs champion 0.0500: 40.0% lower "
                            ">= min_loss_improvement 10.0%: pass")
    assert saturation(rules, GATE) == {"saturated": True, "deciding_metric": "log_loss", "tie": False}


@pytest.mark.parametrize("loss", [0.060, 0.050, 0.046])  # worse, equal, better by less than 10 %
def test_at_the_ceiling_a_candidate_not_clearly_better_calibrated_is_a_tie_rejected(loss):
    decision, rules = decide(metrics(1.0, log_loss=loss), PERFECT, GATE)
    assert decision == "reject" and failed(rules) == ["log_loss"]
    if loss > 0.050:
        assert rules[3]["text"].endswith("0.0600 vs champion 0.0500: 20.0% higher, "
                                         "not min_loss_improvement 10.0% lower: FAIL")
    assert saturation(rules, GATE)["tie"]


@pytest.mark.parametrize(("candidate", "guard"), [
    (metrics(1.0, escape_rate=0.01, log_loss=0.01), "max_escape_increase"),
    (metrics(1.0, overkill_rate=0.02, log_loss=0.01), "max_overkill_increase"),
    (metrics(0.99, log_loss=0.01), "primary_metric"),  # lost more than min_delta: worse, not a tie
])
def test_at_the_ceiling_the_guards_still_veto_and_that_is_no_tie(candidate, guard):
    decision, rules = decide(candidate, PERFECT, GATE)
    assert decision == "reject" and failed(rules) == [guard]
    assert saturation(rules, GATE) == {"saturated": True, "deciding_metric": "log_loss", "tie": False}


def test_at_the_ceiling_floors_and_per_type_ceilings_still_apply():
    candidate = metrics(1.0, log_loss=0.01, defect_types={"crack": typed(10, 1)})
    decision, rules = decide(candidate, PERFECT, replace(GATE, max_escape_rate_per_type=0.05))
    assert decision == "reject" and failed(rules) == ["max_escape_rate_per_type"]
    assert not saturation(rules, GATE)["tie"]
    decision, rules = decide(metrics(0.999, log_loss=0.01), metrics(0.999, log_loss=0.05),
                             replace(GATE, min_accuracy=1.0))
    assert decision == "reject" and failed(rules) == ["min_accuracy"] and rules[2]["saturated"]


def test_saturated_means_no_candidate_could_beat_the_champion_by_min_delta():
    near = metrics(0.997, log_loss=0.05)  # a perfect candidate gains 0.003 < 0.005
    decision, rules = decide(metrics(1.0, log_loss=0.04), near, GATE)
    assert decision == "promote" and rules[2]["saturated"]
    reachable = metrics(0.995, log_loss=0.05)  # a perfect candidate gains exactly min_delta
    decision, rules = decide(metrics(1.0, log_loss=0.06), reachable, GATE)
    assert decision == "promote" and not rules[2]["saturated"]
    assert saturation(rules, GATE)["deciding_metric"] == "accuracy"
    assert "log_loss" not in [rule["rule"] for rule in rules]
    # min_delta 0: a tie at 1.0 passes the primary rule itself, nothing has saturated.
    decision, rules = decide(metrics(1.0, log_loss=0.06), PERFECT, replace(GATE, min_delta=0.0))
    assert decision == "promote" and not rules[2]["saturated"]


def test_at_the_ceiling_the_paired_test_is_on_per_image_log_losses():
    labels = np.array([1, 0] * 20)
    champion = np.where(labels == 1, 0.90, 0.10)
    sharper = np.where(labels == 1, 0.97, 0.03)
    test = paired_loss_test(labels, sharper, champion)
    assert (test["candidate_lower"], test["champion_lower"]) == (40, 0) and test["p_value"] < 1e-6
    assert paired_loss_test(labels, champion, champion) == {"candidate_lower": 0, "champion_lower": 0,
                                                            "p_value": 1.0}
    gate = replace(GATE, significance=0.05)
    mcnemar = mcnemar_exact([True] * 40, [True] * 40)  # p = 1: McNemar could never pass at the ceiling
    candidate = metrics(1.0, log_loss=0.03)
    decision, rules = decide(candidate, PERFECT, gate, mcnemar, test)
    assert decision == "promote" and rules[-1]["rule"] == "loss_test"
    worse = paired_loss_test(labels, champion, sharper)
    decision, rules = decide(candidate, PERFECT, gate, mcnemar, worse)
    assert decision == "reject" and failed(rules) == ["loss_test"] and saturation(rules, gate)["tie"]


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_min_loss_improvement_is_a_share_above_zero_and_below_one(share):
    with pytest.raises(ParamsError, match="gate.min_loss_improvement must be > 0 and < 1"):
        replace(BASE.gate, min_loss_improvement=share)


@pytest.mark.slow
def test_first_run_promotes_on_floors_and_writes_its_reasons(data_dir, base, tmp_path):
    params = gate_params(data_dir, tmp_path / "registry")
    result = gate_candidate(params, good_model(data_dir, base), tmp_path / "reports")
    written = json.loads((tmp_path / "reports" / "gate-details.json").read_text())
    assert written["decision"] == result["decision"] == "promote"
    assert written["champion"] == {"status": "none", "version": None}
    assert written["reasons"][0].startswith("no champion yet")
    assert [rule["rule"] for rule in written["rules"]] == ["min_accuracy", "max_escape_rate"]
    assert written["candidate"]["metrics"]["count"] == written["validation_images"] > 0
    assert len(written["smoke"]) == params.gate.smoke_images
    assert not (tmp_path / "registry" / "log.jsonl").exists()  # a promotion is logged by publish


@pytest.mark.slow
def test_identical_retrain_at_a_perfect_champion_is_a_tie_rejected_on_log_loss(data_dir, base, tmp_path):
    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    params = gate_params(data_dir, registry)
    retrained = train_good_model(params, tmp_path / "retrained.h5")
    result = gate_candidate(params, retrained, tmp_path / "reports")
    assert result["decision"] == "reject"
    assert result["champion"]["status"] == "ok" and result["champion"]["version"] == "v0001"
    primary = next(rule for rule in result["rules"] if rule["rule"] == "primary_metric")
    assert primary["delta"] == pytest.approx(0.0, abs=1e-9) and primary["saturated"] and primary["passed"]
    assert result["mcnemar"]["discordant"] == 0 and result["loss_test"]["p_value"] == 1.0
    loss = next(rule for rule in result["rules"] if rule["rule"] == "log_loss")
    assert loss["improvement"] == pytest.approx(0.0, abs=1e-9) and result["tie"]
    logged = read_log(registry)[-1]
    assert logged["action"] == "reject" and any(r.endswith("FAIL") for r in logged["reasons"])
    assert logged["failed"] == [loss["text"]] == [r["text"] for r in result["rules"] if not r["passed"]]
    assert logged["tie"] and reject_streak(read_log(registry)) == 0


def sharpened(model_path, params, path, factor):
    """The model with its output logit times ``factor``: the same verdicts at 0.5, surer above 1, less sure below."""
    from tasks.inference.model_file import load_model
    from tasks.model.network import save_model

    model = load_model(model_path)
    output = model.get_layer("output")
    output.set_weights([weights * factor for weights in output.get_weights()])
    return save_model(model, path, params.data.class_mapping, params.model)


@pytest.mark.slow
def test_at_a_perfect_champion_a_surer_candidate_is_promoted_and_a_less_sure_one_is_a_tie(data_dir, base, tmp_path):
    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    params = gate_params(data_dir, registry)
    model = good_model(data_dir, base)
    surer = gate_candidate(params, sharpened(model, params, tmp_path / "surer.h5", 2.0), tmp_path / "reports",
                           record=False)
    assert surer["champion"]["metrics"]["accuracy"] == surer["candidate"]["metrics"]["accuracy"] == 1.0
    assert (surer["decision"], surer["saturated"], surer["deciding_metric"]) == ("promote", True, "log_loss")
    assert any(reason.startswith("accuracy has saturated") for reason in surer["reasons"])
    assert surer["loss_test"]["candidate_lower"] > 0 == surer["loss_test"]["champion_lower"]
    written = json.loads((tmp_path / "reports" / "gate.json").read_text())
    assert (written["saturated"], written["deciding_metric"]) == (1, "log_loss")
    assert written["candidate"]["log_loss"] < written["champion"]["log_loss"]

    softer = gate_candidate(params, sharpened(model, params, tmp_path / "softer.h5", 0.5), tmp_path / "softer")
    assert softer["decision"] == "reject" and softer["tie"] and failed(softer["rules"]) == ["log_loss"]
    assert "a tie at the ceiling" in " ".join(softer["reasons"])
    logged = read_log(registry)
    assert (logged[-1]["action"], logged[-1]["tie"], logged[-1]["metric"]) == ("reject", True, "log_loss")
    assert reject_streak(logged) == 0


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_unusable_champion_is_reported_and_judged_on_floors(data_dir, base, tmp_path, damage):
    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    champion_file = registry / CHAMPION_MODEL
    if damage == "corrupt":
        champion_file.write_bytes(champion_file.read_bytes()[:2000])
    else:
        champion_file.unlink()
    params = gate_params(data_dir, registry)
    result = gate_candidate(params, good_model(data_dir, base), tmp_path / "reports", record=False)
    assert result["champion"]["status"] == "unusable"
    assert result["champion"]["version"] == "v0001"  # from champion.json
    assert str(champion_file) in result["champion"]["problem"]
    assert "unusable" in result["reasons"][0] and "floors only" in result["reasons"][0]
    assert [rule["rule"] for rule in result["rules"]] == ["min_accuracy", "max_escape_rate"]
    assert result["decision"] == "promote"  # the floors pass; a failing candidate would not
    weak = save_random_model(params, tmp_path / "weak.h5")  # below the 0.8 accuracy floor
    assert gate_candidate(params, weak, tmp_path / "reports", record=False)["decision"] == "reject"


@pytest.mark.slow
def test_calibrated_threshold_goes_into_the_result(data_dir, base, tmp_path):
    params = gate_params(data_dir, tmp_path / "registry", target_escape_rate=0.0)
    result = gate_candidate(params, good_model(data_dir, base), tmp_path / "reports", record=False)
    assert result["threshold_source"].startswith("calibrated")
    assert result["candidate"]["metrics"]["escape_rate"] == 0.0
    assert result["candidate"]["metrics"]["threshold"] == result["threshold"] != 0.5


def test_missing_candidate_is_a_clear_error(data_dir, tmp_path):
    from tasks.inference.model_file import ModelFileError

    with pytest.raises(ModelFileError, match="candidate.h5: model file not found"):
        run_gate(gate_params(data_dir, tmp_path / "registry"), tmp_path / "candidate.h5", tmp_path)
    assert not (tmp_path / "gate.json").exists()


def typed(count, escapes):
    return {"count": count, "escapes": escapes, "escape_rate": escapes / count,
            "escape_rate_upper95": escape_upper_bound(escapes, count)}


def test_one_defect_type_let_through_is_rejected_though_the_overall_rate_passes():
    # 2 escapes of 50 NG (4 %, under the 5 % floor), both of them blowholes: 2 of 5.
    candidate = metrics(0.97, escape_rate=0.04, defect_types={
        "blowhole": typed(5, 2), "crack": typed(25, 0), "untyped": typed(20, 0),
    })
    assert decide(candidate, None, GATE)[0] == "promote"  # per-type rule off by default
    per_type = replace(GATE, max_escape_rate_per_type=0.1)
    decision, rules = decide(candidate, None, per_type)
    assert decision == "reject"
    assert failed(rules) == ["max_escape_rate_per_type"]
    by_type = {rule["defect_type"]: rule for rule in rules if rule["rule"] == "max_escape_rate_per_type"}
    assert list(by_type) == ["blowhole", "crack", "untyped"]  # one rule per type, each recorded
    blowhole = by_type["blowhole"]
    assert (blowhole["count"], blowhole["escapes"], blowhole["value"], blowhole["limit"]) == (5, 2, 0.4, 0.1)
    assert blowhole["upper95"] == pytest.approx(0.8534, abs=1e-4)
    assert blowhole["text"] == "blowhole escape rate 0.4000 (2 of 5, 95 % upper 0.8534) <= ceiling 0.1000: FAIL"
    assert by_type["crack"]["passed"] and by_type["crack"]["upper95"] == pytest.approx(0.1372, abs=1e-4)


def test_per_type_ceiling_applies_with_a_champion_too():
    candidate = metrics(0.99, escape_rate=0.01, defect_types={"crack": typed(10, 1)})
    gate = replace(GATE, max_escape_rate_per_type=0.05)
    decision, rules = decide(candidate, metrics(0.95, escape_rate=0.02), gate)
    assert decision == "reject" and failed(rules) == ["max_escape_rate_per_type"]
    loose = replace(GATE, max_escape_rate_per_type=0.1)
    assert decide(candidate, metrics(0.95, escape_rate=0.02), loose)[0] == "promote"


def test_per_type_ceiling_must_be_a_rate():
    with pytest.raises(ParamsError, match="gate.max_escape_rate_per_type must be null or between 0 and 1"):
        replace(BASE.gate, max_escape_rate_per_type=5)


@pytest.mark.slow
def test_gate_rejects_a_candidate_that_lets_one_defect_type_through(data_dir, base, tmp_path):
    from tasks.inference.model_file import load_model
    from tasks.inference.predictor import predict_probabilities

    typed_data = copy_with_defect_types(data_dir, tmp_path / "data")
    params = gate_params(typed_data, tmp_path / "registry", max_escape_rate_per_type=0.1)
    model = good_model(data_dir, base)
    validation = select(list_images(typed_data, params.data), "validation")
    expected = Counter(image.defect_type for image in validation if image.defect_type)
    probabilities = predict_probabilities(load_model(model), validation, params.model, 16)
    ng = sorted((float(p), image.defect_type) for p, image in zip(probabilities, validation, strict=True)
                if image.label == 1)
    # A threshold between the two least confident NG images: exactly one NG escapes.
    (lowest, let_through), (second, _) = ng[0], ng[1]
    # 1 escape: within the 0.2 floor overall (5 or more NG), above 0.1 for its type (fewer than 10).
    assert lowest < second and expected[let_through] < 10 and len(ng) >= 5
    params = replace(params, evaluate=replace(params.evaluate,
                                                                      threshold=(lowest + second) / 2))
    result = gate_candidate(params, model, tmp_path / "reports", record=False)

    written = json.loads((tmp_path / "reports" / "gate-details.json").read_text())
    candidate = written["candidate"]["metrics"]
    assert {kind: row["count"] for kind, row in candidate["defect_types"].items()} == expected
    assert candidate["confusion"]["fn"] == 1 and candidate["escape_rate"] <= params.gate.max_escape_rate
    assert candidate["escape_rate"] < candidate["escape_rate_upper95"] <= 1
    assert result["decision"] == written["decision"] == "reject"
    assert failed(written["rules"]) == ["max_escape_rate_per_type"]
    rules = {rule["defect_type"]: rule for rule in written["rules"] if rule["rule"] == "max_escape_rate_per_type"}
    assert list(rules) == sorted(expected)
    assert [kind for kind, rule in rules.items() if not rule["passed"]] == [let_through]
    assert rules[let_through]["escapes"] == 1 and rules[let_through]["count"] == expected[let_through]
    assert rules[let_through]["upper95"] == pytest.approx(escape_upper_bound(1, expected[let_through]))
    assert any(text.startswith(f"{let_through} escape rate") for text in written["failed"])


def test_the_gate_refuses_scores_of_another_model_than_the_candidate(data_dir, base, tmp_path):
    import shutil

    from tasks.inference.scores import ScoresError

    params = gate_params(data_dir, tmp_path / "registry")
    candidate = tmp_path / "candidate.h5"
    shutil.copy(good_model(data_dir, base), candidate)
    gate_candidate(params, candidate, tmp_path / "reports", record=False)
    save_random_model(params, candidate)  # retrained by hand after evaluate scored the old one
    with pytest.raises(ScoresError, match=r"operating-point.json: holds the scores of .* rerun `fanaoi evaluate`"):
        run_gate(params, candidate, tmp_path / "reports", record=False)
