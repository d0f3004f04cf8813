"""The fleet job on Dask: pieces of a Parquet input adapted, forecast and scored by worker processes.

Why Dask (``dask.distributed``) and not Ray Data: the job is a plain map over
independent pieces of a file, each written by its worker, which Dask's futures
express directly (one ``client.submit`` per piece); dask and distributed are
pure-Python wheels (a few MB, no C++ core to build or ship), a
``LocalCluster`` of two worker processes starts in a few seconds, which keeps
the equality test fast, and the same code runs on a cluster by passing its
scheduler address. Ray Data would bring a ~70 MB binary wheel and its own
object store for a job that needs neither.

The plan, for one input file and the job's outputs:

1. Pieces: the rows of the file cut every ``piece_rows`` rows. A piece owns the
   series whose first row lies in it (``read_long(rows=...)``: the last one is
   read on into the next piece, one begun in the piece before is skipped), so no
   series is split and every series is in exactly one piece.
2. Each worker runs ``FleetFrames`` over its pieces, as one process does over
   the file, and writes each output of a piece to its own part file
   (part-000000.parquet, ...) in a temporary folder beside the output (a folder
   every worker must see: on one machine any; on a cluster a shared file system).
3. At the end the folder becomes the output: a ``.parquet`` output is a Parquet
   dataset (a folder of parts in piece order, read as one table by
   ``pandas.read_parquet`` or ``pyarrow.parquet.read_table``); a ``.csv`` output
   is one file, the parts appended in order. The driver never decodes the
   data: re-encoding 2 x 36 million output rows into one Parquet file cost
   more CPU than one worker's share (BENCHMARKS.md). Every number is computed
   per series (the vmapped adaptation treats each series on its own), and rows
   come in input order, so the tables are those of a run in one process
   (tests/timeseries).

Memory per worker is that of one process (bounded by the chunk and the batch
of series); the driver holds 8 bytes a series: each piece returns a stable
64-bit hash of its series ids, and the driver checks at the end that no series
id came in two pieces (its rows split into separate blocks of the file): the
error one process raises as it reads, naming the series, and no output.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from fewshot.tasks.data_root import DataError
from fewshot.timeseries.data import SeriesInputError
from fewshot.timeseries.fleet import FleetFrames, FleetJob, _stream, _Writer


def pieces(input: Path, piece_rows: int) -> list[tuple[int, int]]:
    """Row ranges (first, stop) of ``piece_rows`` rows tiling the Parquet file ``input``."""
    import pyarrow.parquet as pq

    total = pq.ParquetFile(input, pre_buffer=False).metadata.num_rows
    return [(first, min(first + piece_rows, total)) for first in range(0, total, piece_rows)]


def run_piece(job: FleetJob, input: str, rows: tuple[int, int], parts: Sequence[str]) -> dict:
    """On a worker: the job over the series of one piece, into one part file per output.

    Returns the series count, the values flagged, and the sorted hashes of the series ids (uint64).
    """
    import pandas as pd
    import torch

    frames, hashes = FleetFrames(job), []

    def frames_of(block):
        hashes.append(pd.util.hash_array(np.asarray(block.ids, dtype=object)))
        return frames(block)

    n_series = _stream(input, parts, job.chunk_rows, job.batch_series, frames_of, rows)
    ids = np.sort(np.concatenate(hashes)) if hashes else np.empty(0, dtype=np.uint64)
    return {"series": n_series, "flagged": frames.flagged, "ids": ids, "threads": torch.get_num_threads()}


def run_distributed(job: FleetJob, input, outputs: Sequence, workers: int = 2, scheduler: str | None = None, piece_rows: int | None = None) -> dict:
    """Run ``job`` over the Parquet file ``input`` on Dask; the outputs hold the tables ``fleet.run_job`` writes in one process.

    A ``.parquet`` output is written as a Parquet dataset: a folder of that name holding one part
    per piece (part-000000.parquet, ...), which ``pandas.read_parquet`` and
    ``pyarrow.parquet.read_table`` read as one table, rows in input order; a ``.csv`` output is
    one file, the parts appended in order. ``workers`` local worker processes of one thread each
    (a ``LocalCluster``), or the running cluster at ``scheduler``. ``piece_rows``: rows per
    piece (default: the job's chunk_rows).
    """
    from dask.distributed import as_completed

    input = Path(input)
    if not input.is_file():
        raise DataError(f"--input {input}: no such file")
    if input.suffix.lower() != ".parquet":
        raise SeriesInputError(f"--input {input}: --workers and --scheduler need a .parquet input (it is cut into pieces of rows)")
    outputs = [Path(o) for o in outputs]
    for output in outputs:
        if output.suffix.lower() not in (".csv", ".parquet"):
            raise SeriesInputError(f"--output {output}: must end in .csv or .parquet")
    FleetFrames(job)  # a bad run directory or horizon fails here, before any worker starts
    todo = pieces(input, piece_rows or job.chunk_rows)
    folders, stats, hashes = [], {"series": 0, "flagged": 0, "pieces": len(todo), "worker_threads": set()}, []
    try:
        for output in outputs:
            folders.append(Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.parts-")))
        parts = [[str(folder / f"part-{i:06d}{output.suffix.lower()}") for folder, output in zip(folders, outputs)] for i in range(len(todo))]
        with _client(workers, scheduler) as client:
            futures = [client.submit(run_piece, job, str(input), rows, part, pure=False) for rows, part in zip(todo, parts)]
            for future in as_completed(futures):
                result = future.result()
                stats["series"] += result["series"]
                stats["flagged"] += result["flagged"]
                stats["worker_threads"].add(result["threads"])
                hashes.append(result["ids"])
        _check_each_series_once(np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64), input)
        for folder, output in zip(folders, outputs):
            _finish(folder, output)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    stats["worker_threads"] = sorted(stats["worker_threads"])
    return stats


def _finish(folder: Path, output: Path) -> None:
    """The parts in ``folder`` -> ``output``: the folder itself (Parquet dataset) or one CSV file."""
    parts = sorted(folder.iterdir())
    for part in parts:
        if part.stat().st_size == 0:  # a piece that starts no series
            part.unlink()
    if output.suffix.lower() == ".csv":
        writer = _Writer(output)
        for part in parts:
            if part.exists():
                writer.append(part)
        writer.close()
        return
    old = None
    if output.exists() or output.is_symlink():
        old = output.with_name(f".{output.name}.old-{folder.name}")
        output.rename(old)
    folder.rename(output)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _client(workers: int, scheduler: str | None):
    import dask
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    if workers < 1:
        raise SeriesInputError(f"--workers {workers}: must be an integer >= 1")
    # Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, so that glibc gives freed memory back at once;
    # with torch's large short-lived tensors that made every batch fault its pages in anew: 2.7x the CPU time of
    # one process for the same series (BENCHMARKS.md). glibc's default threshold keeps memory flat here.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
    return _ClusterClient(cluster)


class _ClusterClient:
    """A client that closes its local cluster with it."""

    def __init__(self, cluster):
        from dask.distributed import Client

        self.cluster, self.client = cluster, Client(cluster)

    def __enter__(self):
        return self.client

    def __exit__(self, *exc):
        self.client.close()
        self.cluster.close()


def _check_each_series_once(hashes: np.ndarray, input: Path) -> None:
    """The error one process raises if a series id came in two pieces (found again by its hash, reading the ids)."""
    hashes.sort()
    twice = np.flatnonzero(hashes[1:] == hashes[:-1])
    if len(twice):
        raise SeriesInputError(
            f"series_id {_id_with_hash(input, hashes[twice[0]])!r}: its rows are split into separate blocks of the file; "
            "the rows of each series must be contiguous (sort the file by series_id)"
        )


def _id_with_hash(input: Path, wanted: np.uint64) -> str:
    import pandas as pd
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(input, pre_buffer=False).iter_batches(batch_size=1 << 20, columns=["series_id"]):
        ids = batch.column(0).to_pandas().astype(str).to_numpy(dtype=object)
        match = np.flatnonzero(pd.util.hash_array(ids) == wanted)
        if len(match):
            return ids[match[0]]
    return "?"  # pragma: no cover - the hash came from this file
