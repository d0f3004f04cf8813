"""Series as tasks: the support is lag windows of a series' recent history, the query the horizon after it.

For one series with history y_1..y_t, lag L, horizon H and K support windows,
the task is built from the last T = L + K observations only:

    support window j (j = 0..K-1):  input  y[t-T+j : t-T+j+L]
                                    target the next H values that are still <= t (the rest masked)
    query:                          input  y[t-L+1 .. t],   target y[t+1 .. t+H]

Every window is expressed relative to its own last input value and divided by
the series' scale s, the mean absolute one-step change over the T support
observations (the in-sample scale of MASE, Hyndman & Koehler 2006):

    x = (input - input[-1]) / s,    y = (target - input[-1]) / s.

s and every support window are computed from y_1..y_t alone, so nothing of the
query horizon enters the support or the normalisation (tests/timeseries).
Targets carry their weights: a target tensor (..., 2H) holds the H values
(0 where missing) followed by H weights (1 observed, 0 missing or padding).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor


class SeriesTasks(NamedTuple):
    """B series as tasks, stacked (float32)."""

    support_x: Tensor  # (B, K, L)
    support_y: Tensor  # (B, K, 2H): targets then weights
    query_x: Tensor  # (B, L)
    last: Tensor  # (B,) the last observation y_t
    scale: Tensor  # (B,) s


def history_matrix(values: Sequence[np.ndarray], length: int) -> Tensor:
    """The last ``length`` values of every series, right-aligned, NaN on the left of shorter ones: (B, length)."""
    out = np.full((len(values), length), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        tail = v[-length:]
        if len(tail):
            out[i, length - len(tail):] = tail
    return torch.from_numpy(out)


def series_scale(history: Tensor) -> Tensor:
    """s: mean |y_i - y_{i-1}| over the observed history (B, T) -> (B,); mean |y| if that is 0, else 1."""
    steps = (history[:, 1:] - history[:, :-1]).abs()
    scale = _nanmean(steps)
    level = _nanmean(history.abs())
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, level)
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def _nanmean(x: Tensor) -> Tensor:
    finite = torch.isfinite(x)
    return torch.where(finite, x, 0).sum(-1) / finite.sum(-1)


def make_tasks(history: Tensor, lags: int, horizon: int) -> SeriesTasks:
    """Tasks from histories (B, T) (``history_matrix``, T = L + K); see the module docstring."""
    n_series, length = history.shape
    n_windows = length - lags
    if n_windows < 1:
        raise ValueError(f"history length {length} must exceed lags {lags}")
    scale = series_scale(history)  # (B,)
    padded = torch.cat([history, history.new_full((n_series, horizon), float("nan"))], 1)  # (B, T + H)
    windows = padded.unfold(1, lags + horizon, 1)[:, :n_windows]  # (B, K, L + H)
    inputs, targets = windows[..., :lags], windows[..., lags:]
    anchor = inputs[..., -1:]  # (B, K, 1)
    complete = torch.isfinite(inputs).all(-1, keepdim=True)  # (B, K, 1)
    weights = (torch.isfinite(targets) & complete).float()  # (B, K, H)
    s = scale[:, None, None]
    support_x = torch.where(complete, (inputs - anchor) / s, 0)
    support_y = torch.cat([torch.where(weights > 0, (targets - anchor) / s, 0), weights], -1)
    last = history[:, -1]
    query_x = (history[:, -lags:] - last[:, None]) / scale[:, None]  # (B, L)
    return SeriesTasks(support_x, support_y, torch.nan_to_num(query_x), last, scale)


def normalise_target(tasks: SeriesTasks, future: Tensor) -> Tensor:
    """The query target (B, 2H) of future values (B, H) in the tasks' own scale, with weights."""
    weights = torch.isfinite(future).float()
    y = (future - tasks.last[:, None]) / tasks.scale[:, None]
    return torch.cat([torch.where(weights > 0, y, 0), weights], -1)


def denormalise(tasks: SeriesTasks, y: Tensor) -> Tensor:
    """Forecasts (B, H) in the tasks' scale -> the series' own units."""
    return tasks.last[:, None] + tasks.scale[:, None] * y


def masked_mae(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over observed targets; ``target`` is (..., 2H): values then weights.

    In the scale s this is the MASE-like error of the window; absolute rather than
    squared error keeps the inner steps stable on series with outliers."""
    horizon = prediction.shape[-1]
    values, weights = target[..., :horizon], target[..., horizon:]
    return (weights * (prediction - values).abs()).sum() / weights.sum().clamp_min(1)


def sample_training_tasks(
    padded: Tensor, lengths: Tensor, lags: int, horizon: int, n_windows: int, batch: int, generator: torch.Generator
) -> tuple[SeriesTasks, Tensor, Tensor, Tensor]:
    """A meta-batch: random series, each cut at a random origin t.

    Returns (tasks, query target (B, 2H), series index (B,), origin t (B,)).

    ``padded`` (N, T + max_len + H) holds series i at columns T .. T + n_i - 1 (``pad_series``).
    Only series with n_i >= L + 1 + H are drawn; the origin t is uniform in [L + 1, n_i - H],
    so every task has at least one support window and a full horizon. The history is
    columns T + t - T .. T + t - 1 of ``padded``, the target the H columns after it.
    """
    length = lags + n_windows
    eligible = torch.nonzero(lengths >= lags + 1 + horizon).squeeze(1)
    series = eligible[torch.randint(len(eligible), (batch,), generator=generator)]
    low, high = lags + 1, lengths[series] - horizon  # origin t: history y[:t]
    origin = low + (torch.rand(batch, generator=generator) * (high - low + 1)).long()
    columns = origin[:, None] + torch.arange(length, length + length + horizon)[None] - length  # history then future
    window = padded[series[:, None], columns]  # (B, T + H)
    tasks = make_tasks(window[:, :length], lags, horizon)
    return tasks, normalise_target(tasks, window[:, length:]), series, origin


def pad_series(values: Sequence[np.ndarray], lags: int, n_windows: int, horizon: int) -> tuple[Tensor, Tensor]:
    """Series in one NaN-padded tensor for ``sample_training_tasks``: (N, T + max_len + H), lengths (N,)."""
    length = lags + n_windows
    lengths = torch.tensor([len(v) for v in values])
    out = np.full((len(values), length + int(lengths.max()) + horizon), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        out[i, length:length + len(v)] = v
    return torch.from_numpy(out), lengths


def detect_period(values: np.ndarray, candidates: Sequence[int] = (4, 7, 12, 24, 52), threshold: float = 0.3) -> int:
    """The seasonal period of a series of unknown frequency, else 1 (no seasonality).

    The autocorrelation of the first differences at each candidate lag that fits
    three times in the series; multiples of the true period correlate too, so the
    smallest candidate within 80% of the largest autocorrelation wins, if that
    exceeds ``threshold``."""
    diffs = np.diff(np.asarray(values, float))
    acf = {}
    for m in candidates:
        if len(values) < 3 * m:
            continue
        a, b = diffs[m:] - diffs[m:].mean(), diffs[:-m] - diffs[:-m].mean()
        denominator = np.sqrt((a * a).sum() * (b * b).sum())
        acf[m] = (a * b).sum() / denominator if denominator > 0 else 0.0
    if not acf or max(acf.values()) <= threshold:
        return 1
    return min(m for m, r in acf.items() if r >= 0.8 * max(acf.values()))
