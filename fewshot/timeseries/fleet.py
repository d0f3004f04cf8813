"""Fleets of series: stream a long-format file in batches, adapt and forecast and/or score each batch, write as you go.

A ``FleetJob`` says what to do to every series: forecast it (``predict_file``),
score its last values (``anomalies_file``), or both in one pass
(``monitor_file``, two outputs). Memory is bounded by ``chunk_rows`` rows read
plus ``batch_series`` series adapted at once (per-series parameter copies: about
4 bytes x parameters x series), whatever the number of series in the file; each
output is written batch by batch to a temporary file renamed over it at the
end, so a failed run leaves no half-written output. Output rows are in input
order, one per forecast step (forecasts) or scored value (anomaly scores).
``run_job(..., workers=N)`` runs the same job on Dask
(``fewshot.timeseries.distributed``), with the same output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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

    def append(self, part: Path) -> None:
        """Append the rows of a CSV file written by another ``_Writer`` (a distributed piece's part)."""
        with open(part, "rb") as source, open(self.tmp, "ab") as target:
            header = source.readline()
            if self.rows == 0:
                target.write(header)
            while chunk := source.read(1 << 20):
                target.write(chunk)
                self.rows += chunk.count(b"\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        old = None
        if self.path.is_dir():  # the Parquet dataset of an earlier run with --workers
            old = self.path.with_name(f"{Path(self.tmp).name}.old")
            self.path.rename(old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        Path(self.tmp).unlink(missing_ok=True)


def _stream(input, outputs, chunk_rows: int, batch_series: int, frames_of, rows=None) -> int:
    """Read ``input`` in batches of series, write ``frames_of(batch)`` (one frame per output, in input order); returns the series count.

    Each output goes to a temporary file renamed over it at the end; on any error they are removed.
    """
    writers, n_series = [], 0
    try:
        for output in outputs:
            writers.append(_Writer(output))
        for block in read_long(input, chunk_rows, batch_series, rows):
            for writer, frame in zip(writers, frames_of(block)):
                writer.write(frame)
            n_series += len(block.ids)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
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


@dataclass(frozen=True)
class FleetJob:
    """What to do to every series of a file: forecast it, score its last values, or both in one pass.

    Plain values only, so that a distributed worker can rebuild the job from it (``fewshot.timeseries.distributed``).
    """

    run_dir: str
    forecast: bool = True  # write forecasts: series_id, timestamp, step, forecast, lower, upper, method, n_filled
    score: bool = False  # write anomaly scores: series_id, timestamp, value, predicted, lower, upper, score, anomaly
    horizon: int | None = None  # forecast steps (default: each model's horizon)
    last: int | None = None  # values scored per series (default: each model's horizon)
    frequency: str | None = None  # of every series (default: detected per series)
    steps: int | None = None  # adaptation steps (default: the run's adapt_steps)
    batch_series: int = 4096
    chunk_rows: int = 500_000


class FleetFrames:
    """The output frames of a block of series under a job: ``frames(block)`` -> one frame per output, in input order.

    Keeps the count of flagged values and, when ``plot`` is set, the first six
    series drawn (forecasts, or scored values when the job scores).
    """

    def __init__(self, job: FleetJob, plot: bool = False):
        config, self.models = load_run(job.run_dir)
        self.specs = [spec for spec, _ in self.models.values()]
        self.job, self.steps = job, config.adapt_steps if job.steps is None else job.steps
        horizons = [s.horizon for s in self.specs]
        if job.horizon is not None and job.horizon > min(horizons):
            raise ConfigError(f"--horizon {job.horizon}: must be at most {min(horizons)} for this run (its models' horizons: "
                              f"{', '.join(f'{s.name} {s.horizon}' for s in self.specs)})")  # fmt: skip
        self.threshold = anomaly_threshold(job.run_dir)
        self.flagged, self.drawn = 0, [] if plot else None

    def __call__(self, block: SeriesBlock) -> list:
        grouped = _groups_of(block, self.specs, self.job.frequency)
        outputs = [self.forecasts(block, grouped)] if self.job.forecast else []
        return outputs + ([self.scores(block, grouped)] if self.job.score else [])

    def forecasts(self, block: SeriesBlock, grouped: dict[str, list[int]]):
        import pandas as pd

        frames, ids, draw = [], np.asarray(block.ids, dtype=object), self.drawn is not None and not self.job.score
        for name, index in grouped.items():
            spec, maml = self.models[name]
            h = self.job.horizon or spec.horizon
            result = forecast(maml, spec, [block.values[i] for i in index], self.steps, h)
            index = np.asarray(index)
            timestamps = future_timestamps(ids[index], [block.timestamps[i] for i in index], h)
            frames.append(pd.DataFrame({
                "_order": np.repeat(index, h), "series_id": np.repeat(ids[index], h), "timestamp": timestamps, "step": np.tile(np.arange(1, h + 1), len(index)),
                "forecast": result.mean.ravel(), "lower": result.lower.ravel(), "upper": result.upper.ravel(),
                "method": np.repeat(np.asarray(result.method, dtype=object), h), "n_filled": np.repeat(block.n_filled[index], h),
            }))  # fmt: skip
            for j, i in enumerate(index[: max(0, 6 - len(self.drawn))] if draw else []):
                self.drawn.append((block.ids[i], block.values[i], result.mean[j], result.lower[j], result.upper[j], None))
        empty = np.asarray(sorted(set(range(len(ids))) - {i for index in grouped.values() for i in index}), dtype=int)
        if len(empty):  # series without any value: one row, no forecast
            no_step = future_timestamps(ids[empty], [block.timestamps[i] for i in empty], 1)  # empty values of the input's type
            frames.append(pd.DataFrame({"_order": empty, "series_id": ids[empty], "timestamp": no_step, "step": 1, "forecast": np.nan, "lower": np.nan,
                                        "upper": np.nan, "method": "none (no values)", "n_filled": block.n_filled[empty]}))  # fmt: skip
        return _in_input_order(frames)

    def scores(self, block: SeriesBlock, grouped: dict[str, list[int]]):
        """A series too short to score (at most L + last values) is reported with empty scores."""
        import pandas as pd

        from fewshot.timeseries.anomalies import forecaster_scores

        frames, ids, scored = [], np.asarray(block.ids, dtype=object), set()
        for name, index in grouped.items():
            spec, maml = self.models[name]
            n_last = self.job.last or spec.horizon
            usable = np.asarray([i for i in index if len(block.values[i]) > spec.lags + n_last], dtype=int)
            if not len(usable):
                continue
            scored.update(usable.tolist())
            scores = forecaster_scores(maml, spec, [block.values[i] for i in usable], n_last, self.steps)
            flags = scores.score > self.threshold  # (B, N)
            self.flagged += int(flags.sum())
            half = np.repeat(scores.half_width, n_last)
            frames.append(pd.DataFrame({
                "_order": np.repeat(usable, n_last), "series_id": np.repeat(ids[usable], n_last),
                "timestamp": np.concatenate([block.timestamps[i][-n_last:] for i in usable]),
                "value": np.concatenate([block.values[i][-n_last:] for i in usable]),
                "predicted": scores.predicted.ravel(), "lower": scores.predicted.ravel() - half, "upper": scores.predicted.ravel() + half,
                "score": scores.score.ravel(), "anomaly": flags.ravel(),
            }))  # fmt: skip
            for j, i in enumerate(usable[: max(0, 6 - len(self.drawn))] if self.drawn is not None else []):
                h = scores.half_width[j]
                self.drawn.append((block.ids[i], block.values[i], scores.predicted[j], scores.predicted[j] - h, scores.predicted[j] + h, flags[j]))
        short = np.asarray(sorted(set(range(len(ids))) - scored), dtype=int)
        if len(short):  # too short to score: one row, no score
            frames.append(pd.DataFrame({"_order": short, "series_id": ids[short], "timestamp": None, "value": np.nan, "predicted": np.nan,
                                        "lower": np.nan, "upper": np.nan, "score": np.nan, "anomaly": False}))  # fmt: skip
        return _in_input_order(frames)


def run_job(job: FleetJob, input, outputs: Sequence, workers: int = 0, scheduler: str | None = None, plot=None) -> dict:
    """Run ``job`` over ``input`` into ``outputs`` (one file per output of the job); returns series, seconds, flagged, threshold.

    ``workers=0`` and no ``scheduler``: in this process. Otherwise on Dask
    (``fewshot.timeseries.distributed``): ``workers`` local worker processes, or the cluster at ``scheduler``.
    """
    start = time.time()
    if workers or scheduler:
        if plot is not None:
            raise ConfigError("--plot: not available with --workers/--scheduler (draw from a run in one process)")
        from fewshot.timeseries.distributed import run_distributed

        stats = run_distributed(job, input, outputs, workers, scheduler)
    else:
        frames = FleetFrames(job, plot=plot is not None)
        stats = {"series": _stream(input, outputs, job.chunk_rows, job.batch_series, frames), "flagged": frames.flagged}
        if plot is not None:
            from fewshot.timeseries.plots import plot_series

            plot_series(frames.drawn, plot, overlay=job.score)
    return {**stats, "seconds": time.time() - start, "threshold": anomaly_threshold(job.run_dir)}


def predict_file(run_dir, input, output, horizon=None, frequency=None, steps=None, batch_series=4096, chunk_rows=500_000, plot=None,
                 workers=0, scheduler=None) -> dict:  # fmt: skip
    """Forecast every series of ``input`` into ``output``: series_id, timestamp, step, forecast, lower, upper, method, n_filled.

    ``timestamp`` continues each series' own timestamps (``fewshot.timeseries.timestamps``;
    irregular timestamps raise ``IrregularTimestamps``)."""
    job = FleetJob(str(run_dir), horizon=horizon, frequency=frequency, steps=steps, batch_series=batch_series, chunk_rows=chunk_rows)
    return run_job(job, input, [output], workers, scheduler, plot)


def anomaly_threshold(run_dir) -> float:
    path = Path(run_dir) / ANOMALY_FILE
    return float(json.loads(path.read_text())["threshold"]) if path.is_file() else DEFAULT_THRESHOLD


def anomalies_file(run_dir, input, output, last=None, frequency=None, steps=None, batch_series=4096, chunk_rows=500_000, plot=None,
                   workers=0, scheduler=None) -> dict:  # fmt: skip
    """Score the last values of every series: series_id, timestamp, value, predicted, lower, upper, score, anomaly.

    A series too short to score (at most L + last values) is reported with empty scores.
    """
    job = FleetJob(str(run_dir), forecast=False, score=True, last=last, frequency=frequency, steps=steps, batch_series=batch_series,
                   chunk_rows=chunk_rows)  # fmt: skip
    return run_job(job, input, [output], workers, scheduler, plot)


def monitor_file(run_dir, input, forecast_output, anomalies_output, horizon=None, last=None, frequency=None, steps=None,
                 batch_series=4096, chunk_rows=500_000, workers=0, scheduler=None) -> dict:  # fmt: skip
    """Forecast every series and score its last values in one pass over ``input``: the outputs of
    ``predict_file`` and ``anomalies_file``, identical, for one read, one grouping and one write per batch.

    Each series is adapted twice in that pass, as the two commands do: on its history before the
    scored values (so that a value cannot pull the model that scores it towards itself) and on all
    its values (so that the forecast starts from the newest data).
    """
    for argument, path in (("--forecast", forecast_output), ("--anomalies", anomalies_output)):
        if Path(path).suffix.lower() not in (".csv", ".parquet"):
            raise SeriesInputError(f"{argument} {path}: must end in .csv or .parquet")
    if Path(forecast_output).resolve() == Path(anomalies_output).resolve():
        raise ConfigError(f"--anomalies {anomalies_output}: must be another file than --forecast")
    job = FleetJob(str(run_dir), forecast=True, score=True, horizon=horizon, last=last, frequency=frequency, steps=steps,
                   batch_series=batch_series, chunk_rows=chunk_rows)  # fmt: skip
    return run_job(job, input, [forecast_output, anomalies_output], workers, scheduler)
