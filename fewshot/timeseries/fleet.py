"""Fleets of series: stream a long-format file in batches, adapt and forecast (or score) each batch, write as you go.

Memory is bounded by ``chunk_rows`` rows read plus ``batch_series`` series
adapted at once (per-series parameter copies: about 4 bytes x parameters x
series), whatever the number of series in the file; the output is written batch
by batch to a temporary file renamed over ``output`` at the end, so a failed run
leaves no half-written output. Output rows are in input order, one per
forecast step (predict) or scored value (anomalies).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from fewshot.config import ConfigError
from fewshot.timeseries.data import SeriesBlock, SeriesInputError, read_long
from fewshot.timeseries.forecaster import choose_group, forecast, load_run
from fewshot.timeseries.timestamps import future_timestamps

ANOMALY_FILE = "anomaly.json"
DEFAULT_THRESHOLD = 4.0  # used when the run has no threshold chosen on meta-validation series (anomaly.json)


class _Writer:
    """Appends pandas frames to a CSV or Parquet file, written atomically on ``close``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise SeriesInputError(f"--output {path}: must end in .csv or .parquet")
        self.parquet = suffix == ".parquet"
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent or ".", prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.writer, self.rows = None, 0

    def write(self, frame) -> None:
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, table.schema)
            self.writer.write_table(table.cast(self.writer.schema))
        else:
            frame.to_csv(self.tmp, mode="a", header=self.rows == 0, index=False)
        self.rows += len(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        Path(self.tmp).unlink(missing_ok=True)


def _stream(input, output, chunk_rows: int, batch_series: int, frames_of) -> int:
    """Read ``input`` in batches of series, write ``frames_of(batch)`` (in input order) to ``output``; returns the series count.

    Output goes to a temporary file renamed over ``output`` at the end; on any error it is removed.
    """
    writer, n_series = _Writer(output), 0
    try:
        for block in read_long(input, chunk_rows, batch_series):
            writer.write(_in_input_order(frames_of(block)))
            n_series += len(block.ids)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return n_series


def _in_input_order(frames):
    """One frame, rows in input order of the series (a stable sort keeps each series' steps in order)."""
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def _groups_of(block: SeriesBlock, specs, frequency):
    """Series indices per group spec name (series with values only)."""
    chosen: dict[str, list[int]] = {}
    for i, v in enumerate(block.values):
        if len(v):
            chosen.setdefault(choose_group(specs, v, frequency).name, []).append(i)
    return chosen


def predict_file(run_dir, input, output, horizon=None, frequency=None, steps=None, batch_series=4096, chunk_rows=500_000, plot=None) -> dict:
    """Forecast every series of ``input`` into ``output``: series_id, timestamp, step, forecast, lower, upper, method, n_filled.

    ``timestamp`` continues each series' own timestamps (``fewshot.timeseries.timestamps``;
    irregular timestamps raise ``IrregularTimestamps``)."""
    import pandas as pd

    config, models = load_run(run_dir)
    specs = [spec for spec, _ in models.values()]
    steps = config.adapt_steps if steps is None else steps
    if horizon is not None and horizon > min(s.horizon for s in specs):
        raise ConfigError(f"--horizon {horizon}: must be at most {min(s.horizon for s in specs)} for this run (its models' horizons: "
                          f"{', '.join(f'{s.name} {s.horizon}' for s in specs)})")  # fmt: skip
    start, drawn = time.time(), []

    def frames_of(block: SeriesBlock) -> list:
        frames, ids = [], np.asarray(block.ids, dtype=object)
        grouped = _groups_of(block, specs, frequency)
        for name, index in grouped.items():
            spec, maml = models[name]
            h = horizon or spec.horizon
            result = forecast(maml, spec, [block.values[i] for i in index], steps, h)
            index = np.asarray(index)
            timestamps = future_timestamps(ids[index], [block.timestamps[i] for i in index], h)
            frames.append(pd.DataFrame({
                "_order": np.repeat(index, h), "series_id": np.repeat(ids[index], h), "timestamp": timestamps, "step": np.tile(np.arange(1, h + 1), len(index)),
                "forecast": result.mean.ravel(), "lower": result.lower.ravel(), "upper": result.upper.ravel(),
                "method": np.repeat(np.asarray(result.method, dtype=object), h), "n_filled": np.repeat(block.n_filled[index], h),
            }))  # fmt: skip
            for j, i in enumerate(index[: max(0, 6 - len(drawn))] if plot is not None else []):
                drawn.append((block.ids[i], block.values[i], result.mean[j], result.lower[j], result.upper[j], None))
        empty = np.asarray(sorted(set(range(len(ids))) - {i for index in grouped.values() for i in index}), dtype=int)
        if len(empty):  # series without any value: one row, no forecast
            no_step = future_timestamps(ids[empty], [block.timestamps[i] for i in empty], 1)  # empty values of the input's type
            frames.append(pd.DataFrame({"_order": empty, "series_id": ids[empty], "timestamp": no_step, "step": 1, "forecast": np.nan, "lower": np.nan,
                                        "upper": np.nan, "method": "none (no values)", "n_filled": block.n_filled[empty]}))  # fmt: skip
        return frames

    n_series = _stream(input, output, chunk_rows, batch_series, frames_of)
    if plot is not None:
        from fewshot.timeseries.plots import plot_series

        plot_series(drawn, plot)
    return {"series": n_series, "seconds": time.time() - start}


def anomaly_threshold(run_dir) -> float:
    path = Path(run_dir) / ANOMALY_FILE
    return float(json.loads(path.read_text())["threshold"]) if path.is_file() else DEFAULT_THRESHOLD


def anomalies_file(run_dir, input, output, last=None, frequency=None, steps=None, batch_series=4096, chunk_rows=500_000, plot=None) -> dict:
    """Score the last values of every series: series_id, timestamp, value, predicted, lower, upper, score, anomaly.

    A series too short to score (at most L + last values) is reported with empty scores.
    """
    import pandas as pd

    from fewshot.timeseries.anomalies import forecaster_scores

    config, models = load_run(run_dir)
    specs = [spec for spec, _ in models.values()]
    steps = config.adapt_steps if steps is None else steps
    threshold = anomaly_threshold(run_dir)
    start, flagged, drawn = time.time(), 0, []

    def frames_of(block: SeriesBlock) -> list:
        nonlocal flagged
        frames, ids, scored = [], np.asarray(block.ids, dtype=object), set()
        for name, index in _groups_of(block, specs, frequency).items():
            spec, maml = models[name]
            n_last = last or spec.horizon
            usable = np.asarray([i for i in index if len(block.values[i]) > spec.lags + n_last], dtype=int)
            if not len(usable):
                continue
            scored.update(usable.tolist())
            scores = forecaster_scores(maml, spec, [block.values[i] for i in usable], n_last, steps)
            flags = scores.score > threshold  # (B, N)
            flagged += int(flags.sum())
            half = np.repeat(scores.half_width, n_last)
            frames.append(pd.DataFrame({
                "_order": np.repeat(usable, n_last), "series_id": np.repeat(ids[usable], n_last),
                "timestamp": np.concatenate([block.timestamps[i][-n_last:] for i in usable]),
                "value": np.concatenate([block.values[i][-n_last:] for i in usable]),
                "predicted": scores.predicted.ravel(), "lower": scores.predicted.ravel() - half, "upper": scores.predicted.ravel() + half,
                "score": scores.score.ravel(), "anomaly": flags.ravel(),
            }))  # fmt: skip
            for j, i in enumerate(usable[: max(0, 6 - len(drawn))] if plot is not None else []):
                h = scores.half_width[j]
                drawn.append((block.ids[i], block.values[i], scores.predicted[j], scores.predicted[j] - h, scores.predicted[j] + h, flags[j]))
        short = np.asarray(sorted(set(range(len(ids))) - scored), dtype=int)
        if len(short):  # too short to score: one row, no score
            frames.append(pd.DataFrame({"_order": short, "series_id": ids[short], "timestamp": None, "value": np.nan, "predicted": np.nan,
                                        "lower": np.nan, "upper": np.nan, "score": np.nan, "anomaly": False}))  # fmt: skip
        return frames

    n_series = _stream(input, output, chunk_rows, batch_series, frames_of)
    if plot is not None:
        from fewshot.timeseries.plots import plot_series

        plot_series(drawn, plot, overlay=True)
    return {"series": n_series, "seconds": time.time() - start, "flagged": flagged, "threshold": threshold}
