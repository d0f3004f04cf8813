"""The timestamps of a forecast: each series' own timestamps continued at its own step.

A forecast of H values continues the series' timestamps t_1 < ... < t_n:

- numbers (integer or float timestamps, e.g. 0, 1, 2 or 1990, 1991): evenly spaced by
  a step d; the forecast's timestamps are t_n + d, ..., t_n + H d;
- dates: by calendar months when the series moves by a fixed number of months k
  (monthly k = 1, quarterly 3, yearly 12) on the first day of the month, the last day of
  the month, or one fixed day <= 28, at a fixed time of day; else by a fixed duration
  (days, hours, weeks, ...); else by the frequency pandas infers (``pandas.infer_freq``:
  business days, for example). Time zones are kept.

A series whose timestamps fit none of these (a missing month, a skipped integer)
is irregular: ``IrregularTimestamps`` names the series and the first uneven step, since
the model treats consecutive values as one step apart and the forecast would be
silently misplaced. A series with a single timestamp (or none) has no step: its
forecast's timestamps are empty.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from fewshot.timeseries.data import SeriesInputError


class IrregularTimestamps(SeriesInputError):
    """A series' timestamps are not evenly spaced, so its forecast has no well-defined timestamps."""


def future_timestamps(series_ids: Sequence[str], stamps: Sequence[np.ndarray], horizon: int):
    """The next ``horizon`` timestamps of every series (sorted, distinct ``stamps``), concatenated: (B * horizon,).

    Vectorised over the series (a fleet's batch at once). The column keeps the
    input's type: integers (nullable ``Int64``, so that a series without a step
    gets an empty value rather than turning the column into floats), floats, dates.
    """
    import pandas as pd

    if not len(stamps):
        return np.empty(0, np.int64)
    dtype = stamps[0].dtype
    if dtype == object or any(s.dtype != dtype for s in stamps):  # time-zone-aware dates, mixed types: one by one
        return np.concatenate([_one_by_one(i, s, horizon) for i, s in zip(series_ids, stamps)])
    lengths = np.array([len(s) for s in stamps])
    flat = np.concatenate(stamps)
    ends = np.cumsum(lengths)
    no_step = lengths < 2
    last = flat[np.maximum(ends - 1, 0)] if len(flat) else np.zeros(len(stamps), dtype)
    ahead = np.arange(1, horizon + 1)
    if np.issubdtype(dtype, np.number):
        step, even = _steps(flat, lengths, exact=dtype.kind in "iu")
        _check_regular(series_ids, stamps, even | no_step)
        future = last[:, None] + step[:, None] * ahead  # (B, H)
        if dtype.kind in "iu":
            return pd.arrays.IntegerArray(future.astype(np.int64).ravel(), np.repeat(no_step, horizon))
        future[no_step] = np.nan
        return future.ravel()
    if not np.issubdtype(dtype, np.datetime64):
        raise SeriesInputError(f"series {series_ids[0]!r}: column timestamp must hold numbers or dates, got {dtype}")
    future = np.full((len(stamps), horizon), np.datetime64("NaT")).astype(dtype)
    by_month, month_future = _by_months(flat, lengths, last, ahead)
    future[by_month] = month_future[by_month].astype(dtype)
    step, even = _steps(flat.view(np.int64), lengths)
    fixed = even & ~by_month
    future[fixed] = last[fixed, None] + step[fixed, None].astype(f"m8[{np.datetime_data(dtype)[0]}]") * ahead
    for i in np.flatnonzero(~(by_month | fixed | no_step)):  # business days and the like, else irregular
        inferred = _by_pandas(stamps[i], horizon)
        if inferred is None:
            _irregular(series_ids[i], stamps[i])
        future[i] = inferred.astype(dtype)
    return future.ravel()


def _steps(flat: np.ndarray, lengths: np.ndarray, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(step (B,), even (B,)): each series' first step, and whether all its steps equal it (False below 2 values).

    ``flat`` is the series concatenated, ``lengths`` their lengths."""
    counts = np.maximum(lengths - 1, 0)
    ends = np.cumsum(lengths)
    inside = np.ones(max(len(flat) - 1, 0), bool)
    inside[ends[(ends > 0) & (ends < len(flat))] - 1] = False  # steps from one series to the next
    steps = np.diff(flat)[inside]
    series = np.repeat(np.arange(len(lengths)), counts)
    has = counts > 0
    first = np.zeros(len(lengths), steps.dtype)
    first[has] = steps[(np.cumsum(counts) - counts)[has]]
    mismatch = steps != first[series] if exact else ~np.isclose(steps, first[series], rtol=1e-9, atol=0)
    return first, has & (np.bincount(series, weights=mismatch, minlength=len(lengths)) == 0)


def _by_months(flat: np.ndarray, lengths: np.ndarray, last: np.ndarray, ahead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(series continued by calendar months (B,), their continuation (B, H)): a fixed number of months k >= 1
    apart, on the first, the last or one fixed day <= 28 of the month, at a fixed time of day."""
    months = flat.astype("datetime64[M]")
    days = flat.astype("datetime64[D]")
    month_step, even_months = _steps(months.astype(np.int64), lengths)
    time_step, even_time = _steps((flat - days).astype(np.int64), lengths)
    day = (days - months.astype("datetime64[D]")).astype(np.int64)  # 0 = the first of the month
    day_step, even_day = _steps(day, lengths)
    series = np.repeat(np.arange(len(lengths)), lengths)
    not_end = (days + 1).astype("datetime64[M]") == months
    at_end = np.bincount(series, weights=not_end, minlength=len(lengths)) == 0
    last_day = day[np.cumsum(lengths) - 1] if len(flat) else np.zeros(len(lengths), np.int64)  # (garbage for empty series: unused)
    on_day = even_day & (day_step == 0) & (last_day < 28)
    chosen = even_months & (month_step >= 1) & even_time & (time_step == 0) & (at_end | on_day)
    future_months = last.astype("datetime64[M]")[:, None] + month_step[:, None] * ahead  # (B, H)
    landing = np.where(at_end[:, None], (future_months + 1).astype("datetime64[D]") - 1, future_months.astype("datetime64[D]") + last_day[:, None])
    return chosen, landing + (last - last.astype("datetime64[D]"))[:, None]


def _inferred_frequency_as_offset(pd):
    """pandas 3 warns that ``infer_freq`` will return an offset instead of a string unless asked for the
    offset now (``date_range`` takes either); pandas 2 has no such option."""
    try:
        pd.get_option("future.infer_freq_returns_offset")
    except KeyError:  # pandas' OptionError is a KeyError
        return contextlib.nullcontext()
    return pd.option_context("future.infer_freq_returns_offset", True)


def _by_pandas(stamps: np.ndarray, horizon: int) -> np.ndarray | None:
    import pandas as pd

    if len(stamps) < 3:
        return None
    with _inferred_frequency_as_offset(pd):
        frequency = pd.infer_freq(pd.DatetimeIndex(stamps))
    if frequency is None:
        return None
    return pd.date_range(stamps[-1], periods=horizon + 1, freq=frequency)[1:].to_numpy()


def _one_by_one(series_id: str, stamps: np.ndarray, horizon: int) -> np.ndarray:
    """One series of time-zone-aware dates (Timestamp objects), continued in wall-clock time."""
    import pandas as pd

    try:
        index = pd.DatetimeIndex(stamps)
    except (TypeError, ValueError) as e:
        raise SeriesInputError(f"series {series_id!r}: column timestamp must hold numbers or dates ({e})") from e
    local = np.asarray(future_timestamps([series_id], [index.tz_localize(None).to_numpy()], horizon))
    return pd.DatetimeIndex(local).tz_localize(index.tz).to_numpy(dtype=object) if index.tz else local.astype(object)


def _check_regular(series_ids, stamps, regular: np.ndarray) -> None:
    if not regular.all():
        i = int(np.flatnonzero(~regular)[0])
        _irregular(series_ids[i], stamps[i])


def _irregular(series_id: str, stamps: np.ndarray) -> None:
    """Raise ``IrregularTimestamps`` naming the first step that differs from the series' first step."""
    import pandas as pd

    step, unit = np.diff(stamps), None
    dates = np.issubdtype(stamps.dtype, np.datetime64)
    if dates:
        if _by_months(stamps[:2], np.array([2]), stamps[1:2], np.arange(1, 2))[0][0]:  # its first step is calendar months
            step, unit = np.diff(stamps.astype("datetime64[M]").astype(np.int64)), "months"
    j = int(np.flatnonzero(step != step[0])[0]) if (step != step[0]).any() else 0
    before, after = (pd.Timestamp(t) if dates else t for t in stamps[j:j + 2])
    first = f"{step[0]} {unit}" if unit else pd.Timedelta(step[0]) if dates else step[0]
    raise IrregularTimestamps(
        f"series {series_id!r}: timestamps are not evenly spaced ({before} -> {after} after a step of "
        f"{first}); a forecast needs one value per step: add the missing timestamps with an empty value "
        "(they are interpolated) or resample the series"
    )
