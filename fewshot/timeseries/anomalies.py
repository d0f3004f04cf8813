"""Anomaly scores from the adapted forecaster, injected anomalies with known labels, detection metrics.

Score of an observation y_t among the last N values of a series: the model is
adapted on the values before them, predicts y_t one step ahead from the L
values before t (values already scored as outliers replaced by their forecasts),
and the score is the standardised residual

    score_t = |y_t - yhat_t| / (s * sigma_1),

sigma_1 the adapted model's one-step root mean square error on its support
windows, s the series' scale; y_t is flagged when score_t exceeds a threshold
chosen on meta-validation series (``best_threshold``). The 95% interval of
yhat_t is yhat_t ± 1.96 s sigma_1: a flagged value lies outside the interval
widened to threshold / 1.96 times.

Baselines: a rolling z-score (the mean and standard deviation of the previous
``window`` values) and the seasonal-naive residual |y_t - y_{t-m}| divided by the
robust spread (1.4826 MAD) of seasonal differences in the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fewshot.algorithms.maml import MAML
from fewshot.timeseries.forecaster import GroupSpec, adapt_and_predict, batched_forward
from fewshot.timeseries.windows import history_matrix, make_tasks

KINDS = ("spike", "level_shift", "variance_change", "seasonal_break")


@dataclass
class Scores:
    score: np.ndarray  # (B, N) standardised residuals of the last N values
    predicted: np.ndarray  # (B, N) one-step-ahead forecasts
    half_width: np.ndarray  # (B,) half-width of the 95% one-step interval


def forecaster_scores(maml: MAML, spec: GroupSpec, values: Sequence[np.ndarray], last: int, steps: int, clean_above: float = 3.0) -> Scores:
    """Scores of the last ``last`` values of every series (each longer than ``last + spec.lags``).

    The values are scored in time order, all series at once; a value scoring above
    ``clean_above`` is replaced by its forecast in the inputs of the later forecasts,
    so one spike does not also make the value after it look anomalous.
    """
    histories = [v[:-last] for v in values]
    tasks = make_tasks(history_matrix(histories, spec.lags + spec.windows), spec.lags, spec.horizon)
    params, _, sigma = adapt_and_predict(maml, tasks, steps)
    unit = tasks.scale * sigma[:, 0].clamp_min(1e-3)  # (B,) s * sigma_1
    recent = history_matrix(values, spec.lags + last)  # (B, L + N): the inputs of every one-step forecast
    actual = recent[:, spec.lags:].clone()
    cleaned = recent.clone()
    predicted, score = torch.empty_like(actual), torch.empty_like(actual)
    for j in range(last):
        inputs = cleaned[:, j:j + spec.lags]  # (B, L)
        anchor = inputs[:, -1:]
        x = torch.nan_to_num((inputs - anchor) / tasks.scale[:, None])
        with torch.no_grad():
            step_1 = batched_forward(maml, params, x[:, None])[:, 0, 0]  # (B,)
        predicted[:, j] = anchor[:, 0] + tasks.scale * step_1
        score[:, j] = (actual[:, j] - predicted[:, j]).abs() / unit
        outlier = score[:, j] > clean_above
        cleaned[:, spec.lags + j] = torch.where(outlier, predicted[:, j], cleaned[:, spec.lags + j])
    half = 1.959964 * unit
    return Scores(score.double().numpy(), predicted.double().numpy(), half.double().numpy())


def rolling_zscore(values: np.ndarray, last: int, window: int) -> np.ndarray:
    """|y_t - mean| / std of the ``window`` values before t, for the last ``last`` values: (last,)."""
    out = np.empty(last)
    for i, t in enumerate(range(len(values) - last, len(values))):
        past = values[max(0, t - window):t]
        spread = past.std()
        out[i] = abs(values[t] - past.mean()) / (spread if spread > 0 else 1.0)
    return out


def seasonal_naive_scores(values: np.ndarray, last: int, period: int) -> np.ndarray:
    """|y_t - y_{t-m}| / (1.4826 MAD of the history's seasonal differences), for the last ``last`` values."""
    m = period if len(values) - last > 2 * period else 1
    history = values[:-last]
    diffs = history[m:] - history[:-m]
    spread = 1.4826 * np.median(np.abs(diffs - np.median(diffs)))
    spread = spread if spread > 0 else (np.abs(diffs).mean() or 1.0)
    t = np.arange(len(values) - last, len(values))
    return np.abs(values[t] - values[t - m]) / spread


# --------------------------------------------------------------------------- injected anomalies


def noise_scale(history: np.ndarray, period: int) -> float:
    """Robust spread of the history's seasonal differences: the unit of injected anomalies."""
    m = period if len(history) > 2 * period else 1
    diffs = history[m:] - history[:-m]
    spread = 1.4826 * np.median(np.abs(diffs - np.median(diffs)))
    return float(spread if spread > 0 else np.abs(diffs).mean() or 1.0)


def inject(history: np.ndarray, region: np.ndarray, period: int, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``region`` (the values after ``history``) with one anomaly of ``kind``; returns (values, labels).

    spike: one value moved by 3-6 units; level_shift: 3 to 6 consecutive values
    moved by 3-5 units (a transient shift); variance_change: Gaussian noise of 3
    units on 4 values; seasonal_break: up to 6 values (at most one season) with
    the seasonal profile estimated from the history subtracted twice (the pattern
    reversed). Every changed value is labelled. A unit is ``noise_scale``: the
    robust spread of seasonal differences, so an anomaly stands out by the same
    amount on every series.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    unit = noise_scale(history, period)
    values, labels = region.astype(float).copy(), np.zeros(len(region), dtype=bool)
    n = len(region)
    sign = rng.choice([-1.0, 1.0])
    if kind == "spike":
        p = rng.integers(n)
        values[p] += sign * rng.uniform(3, 6) * unit
        labels[p] = True
    elif kind == "level_shift":
        length = min(int(rng.integers(3, 7)), n)
        p = rng.integers(n - length + 1)
        values[p:p + length] += sign * rng.uniform(3, 5) * unit
        labels[p:p + length] = True
    elif kind == "variance_change":
        length = min(4, n)
        p = rng.integers(n - length + 1)
        values[p:p + length] += rng.normal(0, 3 * unit, length)
        labels[p:p + length] = True
    else:
        m = min(period, n, 6)
        p = rng.integers(n - m + 1)
        profile = seasonal_profile(history, period)
        phase = (len(history) + p + np.arange(m)) % period
        values[p:p + m] -= 2 * profile[phase]
        labels[p:p + m] = True
    return values, labels


def seasonal_profile(history: np.ndarray, period: int) -> np.ndarray:
    """Mean deviation from the centred yearly mean at each phase (period,); phase 0 = the first value."""
    if period <= 1 or len(history) < 2 * period:
        return np.zeros(max(period, 1))
    kernel = np.ones(period) / period
    trend = np.convolve(history, kernel, mode="same")
    deviation = history - trend
    half = period // 2
    phases = np.arange(len(history)) % period
    keep = slice(half, len(history) - half)
    return np.array([deviation[keep][phases[keep] == k].mean() for k in range(period)])


# --------------------------------------------------------------------------- metrics


def precision_recall_f1(labels: np.ndarray, flagged: np.ndarray) -> tuple[float, float, float]:
    true_positive = np.sum(labels & flagged)
    precision = true_positive / max(flagged.sum(), 1)
    recall = true_positive / max(labels.sum(), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: mean precision at each true positive."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(float)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / max(hits.sum(), 1))


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold with the highest F1 on (validation) labels and scores."""
    candidates = np.unique(np.quantile(scores, np.linspace(0.5, 1, 201)))
    f1 = [precision_recall_f1(labels, scores >= c)[2] for c in candidates]
    return float(candidates[int(np.argmax(f1))])
