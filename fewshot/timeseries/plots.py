"""A PNG of a few series: history, forecast with its 95% interval, flagged values."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_series(series, path: Path, overlay: bool = False) -> Path:
    """``series``: (id, values, forecast, lower, upper, flags or None) tuples.

    Forecasts follow the history; with ``overlay`` they are one-step forecasts of
    the history's last values (anomaly scoring) and ``flags`` marks the flagged ones.
    """
    from fewshot.plots import pyplot, save_figure

    plt = pyplot()
    n = max(len(series), 1)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.2 * n), squeeze=False)
    for ax, (series_id, values, mean, lower, upper, flags) in zip(axes[:, 0], series):
        t = np.arange(len(values))
        ax.plot(t, values, color="black", lw=1, label="observed")
        start = len(values) - len(mean) if overlay else len(values)
        tf = np.arange(start, start + len(mean))
        ax.plot(tf, mean, color="tab:blue", lw=1.5, label="forecast")
        ax.fill_between(tf, lower, upper, color="tab:blue", alpha=0.25, label="95% interval")
        if flags is not None and np.any(flags):
            ax.scatter(tf[flags], values[start:][flags], color="red", zorder=3, label="flagged")
        ax.set_title(str(series_id), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, dpi=80)
