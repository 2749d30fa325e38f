import numpy as np
import pytest

from tasks.inference.metrics import (
    REVIEW,
    calibrate_threshold,
    choose_threshold,
    classification_metrics,
    defect_type_lines,
    escape_bounds,
    escape_upper_bound,
    escapes_by_type,
    keras_loss_and_accuracy,
    log_losses,
    roc_auc,
    verdicts,
)


def test_escape_and_overkill_follow_aoi_meaning():
    labels = [1, 1, 1, 1, 0, 0, 0, 0]  # NG = 1
    scores = [0.9, 0.8, 0.2, 0.1, 0.1, 0.2, 0.3, 0.7]
    metrics = classification_metrics(labels, scores, threshold=0.5)
    assert metrics["confusion"] == {"tn": 3, "fp": 1, "fn": 2, "tp": 2}
    assert metrics["escape_rate"] == pytest.approx(0.5)  # 2 of 4 NG passed as GO
    assert metrics["overkill_rate"] == pytest.approx(0.25)  # 1 of 4 GO rejected
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx(1 - (0.5 + 0.25) / 2)


def test_threshold_moves_decisions():
    metrics = classification_metrics([1, 0], [0.4, 0.3], threshold=0.35)
    assert metrics["confusion"] == {"tn": 1, "fp": 0, "fn": 0, "tp": 1}


def test_log_loss_tells_apart_models_that_accuracy_cannot():
    labels = [1, 1, 0, 0]
    sure, unsure = [0.99, 0.95, 0.01, 0.05], [0.6, 0.7, 0.4, 0.3]
    metrics = [classification_metrics(labels, scores, threshold=0.5) for scores in (sure, unsure)]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"] == 1.0
    assert metrics[0]["log_loss"] == pytest.approx(-np.mean(np.log([0.99, 0.95, 0.99, 0.95])))
    assert metrics[0]["log_loss"] < metrics[1]["log_loss"]
    # Clipped as Keras clips: a certain mistake costs -log(1e-7), not infinity.
    assert log_losses([1], [0.0])[0] == pytest.approx(-np.log(1e-7))
    assert keras_loss_and_accuracy(labels, sure)["loss"] == pytest.approx(metrics[0]["log_loss"])


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(labels, scores) == pytest.approx(pairwise)


@pytest.mark.parametrize(("escapes", "count", "upper"), [
    (0, 40, 1 - 0.025 ** (1 / 40)),  # 0.0881: zero escapes among 40 is not 0 %
    (0, 10, 1 - 0.025 ** (1 / 10)),  # 0.3085
    (39, 40, 0.975 ** (1 / 40)),  # all but one escaped: closed form as well
    (1, 10, 0.4450),  # Clopper and Pearson's tables / R binom.test(1, 10)
    (5, 10, 0.8129),
    (3, 3, 1.0),
    (0, 0, 1.0),  # no images: nothing is known
])
def test_escape_upper_bound_is_the_exact_clopper_pearson_limit(escapes, count, upper):
    assert escape_upper_bound(escapes, count) == pytest.approx(upper, abs=5e-5)


def test_escape_upper_bound_of_0_of_40_is_about_0_088():
    assert round(escape_upper_bound(0, 40), 3) == 0.088


def test_escapes_are_counted_per_defect_type():
    labels = [1, 1, 1, 1, 1, 1, 1, 0, 0]
    predicted = [0, 1, 1, 1, 0, 0, 1, 1, 0]
    types = ["crack", "crack", "crack", "blowhole", "blowhole", "untyped", "untyped", None, None]
    per_type = escapes_by_type(labels, predicted, types)
    assert list(per_type) == ["blowhole", "crack", "untyped"]  # sorted, GO (None) left out
    assert per_type["crack"] == {
        "count": 3, "escapes": 1, "escape_rate": pytest.approx(1 / 3),
        "escape_rate_upper95": pytest.approx(escape_upper_bound(1, 3)),
    }
    assert (per_type["blowhole"]["count"], per_type["blowhole"]["escapes"]) == (2, 1)
    assert (per_type["untyped"]["count"], per_type["untyped"]["escapes"]) == (2, 1)
    bounds = escape_bounds(labels, [0.1 if p == 0 else 0.9 for p in predicted], 0.5, types)
    assert bounds["defect_types"] == per_type
    assert bounds["escape_rate_upper95"] == pytest.approx(escape_upper_bound(3, 7))
    assert defect_type_lines(bounds)[1] == "crack: 1 of 3 escaped, 0.3333 (95 % upper 0.9057)"
    flat = escape_bounds(labels, [0.1 if p == 0 else 0.9 for p in predicted], 0.5,
                         ["untyped" if t else None for t in types])
    assert defect_type_lines(flat) == []  # no NG subfolders: the overall rate says it all


def test_calibrated_threshold_meets_the_target_with_least_overkill_midway_in_its_gap():
    labels = np.array([1] * 10 + [0] * 4)
    scores = np.array([0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.01, 0.1, 0.25, 0.6])
    # 0.2 of 11 ranks: a new NG part falls below the 2nd lowest NG score with chance 2/11,
    # below the 3rd with 3/11 > 0.2, so 1 of these 10 may escape, not 2.
    threshold = calibrate_threshold(labels, scores, target_escape_rate=0.2)
    assert threshold == pytest.approx((0.1 + 0.2) / 2)  # between the GO at 0.1 and the NG at 0.2
    assert np.sum((scores < threshold) & (labels == 1)) == 1
    assert np.sum((scores >= threshold) & (labels == 0)) == 2  # as few as at 0.2, the highest allowed
    assert calibrate_threshold(labels, scores, 0.3) == pytest.approx((0.25 + 0.3) / 2)  # 3/11 <= 0.3: 2 escape
    assert calibrate_threshold(labels, scores, 0.0) == pytest.approx((0.01 + 0.05) / 2)


def test_calibrated_threshold_lets_through_one_validation_escape_per_target_of_new_parts():
    # 0.005: one of 233 NG images escaping would leave a new NG part 2/234 = 0.85 % to escape.
    for count, allowed in ((199, 0), (233, 0), (398, 0), (399, 1), (599, 2)):
        ng_scores = np.linspace(0.5, 1.0, count)
        labels = np.array([1] * count + [0] * count)
        scores = np.concatenate([ng_scores, ng_scores - 1e-4])  # a GO part right under each NG
        threshold = calibrate_threshold(labels, scores, 0.005)
        assert np.sum((scores < threshold) & (labels == 1)) == allowed, count


def test_separated_scores_get_a_threshold_with_margin_on_both_sides():
    labels = np.array([1] * 5 + [0] * 5)
    scores = np.array([0.97, 0.98, 0.99, 0.995, 0.999, 0.001, 0.01, 0.02, 0.03, 0.04])
    assert calibrate_threshold(labels, scores, 0.0) == pytest.approx((0.04 + 0.97) / 2)


def test_threshold_is_calibrated_only_with_enough_defects_to_measure_the_target():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 250 + [0] * 250)
    scores = np.where(labels == 1, rng.uniform(0.2, 1.0, 500), rng.uniform(0.0, 0.6, 500))
    chosen = choose_threshold(labels, scores, target_escape_rate=0.005, default=0.5)
    assert chosen["source"].startswith("calibrated on 250 validation NG images")
    assert np.sum((scores < chosen["threshold"]) & (labels == 1)) <= 1  # 0.5 % of 250
    few = choose_threshold(labels[150:], scores[150:], target_escape_rate=0.005, default=0.5)
    assert few["threshold"] == 0.5
    assert "validation holds 100 NG images, fewer than the 200" in few["source"]
    assert choose_threshold(labels, scores, None, 0.4) == {
        "threshold": 0.4, "source": "evaluate.threshold (gate.target_escape_rate is null)"}


def test_review_band_takes_parts_out_of_the_automatic_decision():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.95, 0.45, 0.2, 0.55, 0.3, 0.05])
    assert verdicts(scores, 0.5, (0.25, 0.6)).tolist() == [1, REVIEW, 0, REVIEW, REVIEW, 0]
    metrics = classification_metrics(labels, scores, 0.5, review_band=(0.25, 0.6))
    assert metrics["escape_rate"] == pytest.approx(2 / 3)  # the band does not change these
    assert metrics["overkill_rate"] == pytest.approx(1 / 3)
    assert metrics["review_rate"] == pytest.approx(3 / 6)
    assert metrics["escape_rate_after_review"] == pytest.approx(1 / 3)  # only 0.2 passes unseen
    assert metrics["overkill_rate_after_review"] == 0.0
    plain = classification_metrics(labels, scores, 0.5)
    assert plain["review_rate"] == 0.0 and plain["escape_rate_after_review"] == plain["escape_rate"]
