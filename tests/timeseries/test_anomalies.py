import numpy as np
import pytest

from fewshot.timeseries.anomalies import (
    KINDS,
    average_precision,
    best_threshold,
    inject,
    noise_scale,
    precision_recall_f1,
    rolling_zscore,
    seasonal_naive_scores,
)


@pytest.mark.parametrize("kind", KINDS)
def test_injection_changes_exactly_the_labelled_values(kind):
    rng = np.random.default_rng(1)
    t = np.arange(72)
    history = 100 + 10 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 1, 72)
    region = 100 + 10 * np.sin(2 * np.pi * np.arange(72, 90) / 12)
    values, labels = inject(history, region, 12, kind, np.random.default_rng(0))
    changed = values != region
    assert labels.any() and (changed == labels).all()
    if kind in ("spike", "level_shift"):
        assert (np.abs(values - region)[labels] >= 3 * noise_scale(history, 12) - 1e-9).all()
    with pytest.raises(ValueError, match="kind must be one of"):
        inject(history, region, 12, "drift", np.random.default_rng(0))


def test_detection_metrics():
    labels = np.array([True, False, True, False])
    assert precision_recall_f1(labels, np.array([True, True, False, False])) == (0.5, 0.5, 0.5)
    assert average_precision(labels, np.array([0.9, 0.1, 0.8, 0.2])) == 1.0
    assert average_precision(labels, np.array([0.1, 0.9, 0.2, 0.8])) == pytest.approx((1 / 3 + 2 / 4) / 2)
    scores = np.array([0.9, 0.1, 0.8, 0.2])
    assert precision_recall_f1(labels, scores >= best_threshold(labels, scores)) == (1.0, 1.0, 1.0)


def test_baseline_detectors_flag_a_spike():
    values = 10 + np.sin(2 * np.pi * np.arange(48) / 12)
    values[-3] += 5
    assert np.argmax(rolling_zscore(values, 6, window=12)) == 3
    assert np.argmax(seasonal_naive_scores(values, 6, 12)) == 3
