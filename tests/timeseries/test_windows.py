import numpy as np
import pytest
import torch

from fewshot.timeseries.accuracy import mase, seasonal_naive, smape
from fewshot.timeseries.windows import (
    denormalise,
    detect_period,
    history_matrix,
    make_tasks,
    pad_series,
    sample_training_tasks,
    series_scale,
)


def random_walks(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return [100 + np.cumsum(rng.normal(size=length - i % 7)) for i in range(n)]


def test_support_and_scale_never_use_the_query_horizon():
    """Meta-training tasks: overwriting each task's future leaves its support, query input and scale unchanged."""
    lags, horizon, windows = 6, 4, 10
    series = random_walks(20, 40)
    padded, lengths = pad_series(series, lags, windows, horizon)
    length = lags + windows
    for seed in range(30):
        tasks, target, index, origin = sample_training_tasks(padded, lengths, lags, horizon, windows, 1, torch.Generator().manual_seed(seed))
        poisoned = padded.clone()
        poisoned[index[0], length + origin[0]:] = 1e6  # everything from y_{t+1} on
        again, target2, index2, origin2 = sample_training_tasks(poisoned, lengths, lags, horizon, windows, 1, torch.Generator().manual_seed(seed))
        assert index2 == index and origin2 == origin
        for a, b in zip(tasks, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(target, target2)  # the query target is the future
        # the query target is exactly the next H values of the series after the origin
        future = torch.tensor(series[index[0]][origin[0]:origin[0] + horizon], dtype=torch.float32)
        torch.testing.assert_close(denormalise(tasks, target[:, :horizon])[0], future)


def test_windows_targets_and_masks():
    history = history_matrix([np.arange(1.0, 11.0), np.arange(3.0)], 6)  # (2, 6): 5..10 and NaN NaN NaN 0 1 2
    tasks = make_tasks(history, lags=3, horizon=2)
    # series 0: windows [5,6,7]->[8,9], [6,7,8]->[9,10], [7,8,9]->[10, missing]; relative to the last input
    assert tasks.support_x.shape == (2, 3, 3) and tasks.support_y.shape == (2, 3, 4)
    torch.testing.assert_close(tasks.support_y[0], torch.tensor([[1.0, 2, 1, 1], [1, 2, 1, 1], [1, 0, 1, 0]]))
    torch.testing.assert_close(tasks.query_x[0], torch.tensor([-2.0, -1, 0]))
    assert tasks.support_y[1, :, 2:].sum() == 0  # no complete window in a 3-value series: all masked
    assert tasks.scale.tolist() == [1.0, 1.0]
    assert torch.isfinite(tasks.support_x).all() and torch.isfinite(tasks.support_y).all()


def test_scale_is_mean_absolute_step_with_fallbacks():
    history = torch.tensor([[1.0, 3.0, 2.0, 6.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    assert series_scale(history).tolist() == [pytest.approx(7 / 3), 5.0, 1.0]


def test_detect_period():
    t = np.arange(120)
    rng = np.random.default_rng(0)
    assert detect_period(10 + np.sin(2 * np.pi * t / 12) + 0.1 * rng.normal(size=120)) == 12
    assert detect_period(10 + np.sin(2 * np.pi * t / 4) + 0.1 * rng.normal(size=120)) == 4
    assert detect_period(np.cumsum(rng.normal(size=120))) == 1


def test_accuracy_measures():
    assert smape([100, 100], [100, 50]) == pytest.approx(100 * (50 / 150))
    history = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    assert mase(history, [10, 11], [9, 11], period=1) == pytest.approx(0.5)
    assert seasonal_naive(history, 5, period=4).tolist() == [5, 6, 7, 8, 5]
    assert seasonal_naive(history, 2, period=1).tolist() == [8, 8]
