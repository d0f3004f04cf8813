"""Forecast accuracy as the M competitions score it.

sMAPE (Makridakis & Hibon 2000, the M3 paper): 200 |y - f| / (|y| + |f|),
averaged over the horizon, then over series. MASE (Hyndman & Koehler 2006): mean
absolute error over the horizon divided by the in-sample mean absolute error of
the seasonal naive forecast (lag m = the seasonal period, 1 for yearly data).
"""

from __future__ import annotations

import numpy as np


def smape(actual: np.ndarray, forecast: np.ndarray) -> float:
    """sMAPE in percent of one series' horizon (Makridakis & Hibon 2000)."""
    actual, forecast = np.asarray(actual, float), np.asarray(forecast, float)
    denominator = np.abs(actual) + np.abs(forecast)
    ratio = np.where(denominator > 0, np.abs(actual - forecast) / np.where(denominator > 0, denominator, 1), 0.0)
    return float(200 * ratio.mean())


def mase(history: np.ndarray, actual: np.ndarray, forecast: np.ndarray, period: int) -> float:
    """MASE of one series: MAE / in-sample MAE of the seasonal naive forecast (lag ``period``)."""
    history = np.asarray(history, float)
    lag = period if len(history) > period else 1
    scale = np.mean(np.abs(history[lag:] - history[:-lag]))
    error = np.mean(np.abs(np.asarray(actual, float) - np.asarray(forecast, float)))
    return float(error / scale) if scale > 0 else float("nan")


def seasonal_naive(history: np.ndarray, horizon: int, period: int) -> np.ndarray:
    """The last full season repeated (the last value if the series is shorter than a season or period is 1)."""
    history = np.asarray(history, float)
    if period <= 1 or len(history) < period:
        return np.repeat(history[-1], horizon)
    season = history[-period:]
    return np.resize(season, horizon)
