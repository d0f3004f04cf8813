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
   the file, and writes each output of a piece to its own part file in a
   temporary folder beside the first output (a folder that every worker must
   see: on one machine any; on a cluster a shared file system).
3. The driver appends the parts to the outputs in piece order as they finish,
   and removes them. Every number is computed per series (the vmapped
   adaptation treats each series on its own), and rows come in input order, so
   the outputs hold the same rows as a run in one process (tests/timeseries).

Memory per worker is that of one process (bounded by the chunk and the batch
of series); the driver holds one part's row group at a time, plus 8 bytes a
series: each piece returns a stable 64-bit hash of its series ids, and the
driver checks at the end that no series id came in two pieces (its rows split
into separate blocks of the file), which one process reports as it reads.
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
    """Run ``job`` over the Parquet file ``input`` on Dask; the outputs are those of ``fleet.run_job`` in one process.

    ``workers`` local worker processes of one thread each (a ``LocalCluster``), or the
    running cluster at ``scheduler``. ``piece_rows``: rows per piece (default: the job's chunk_rows).
    """
    input = Path(input)
    if not input.is_file():
        raise DataError(f"--input {input}: no such file")
    if input.suffix.lower() != ".parquet":
        raise SeriesInputError(f"--input {input}: --workers and --scheduler need a .parquet input (it is cut into pieces of rows)")
    FleetFrames(job)  # a bad run directory or horizon fails here, before any worker starts
    todo = pieces(input, piece_rows or job.chunk_rows)
    writers, parts_dir = [], Path(tempfile.mkdtemp(dir=Path(outputs[0]).parent, prefix=".fleet-parts-"))
    stats = {"series": 0, "flagged": 0, "pieces": len(todo), "worker_threads": set()}
    try:
        for output in outputs:
            writers.append(_Writer(output))
        with _client(workers, scheduler) as client:
            parts = [[str(parts_dir / f"{i:06d}-{k}{Path(o).suffix.lower()}") for k, o in enumerate(outputs)] for i in range(len(todo))]
            futures = [client.submit(run_piece, job, str(input), rows, part, pure=False) for rows, part in zip(todo, parts)]
            hashes = []
            for future, part in zip(futures, parts):  # in piece order, as they finish
                result = future.result()
                if result["series"]:
                    for writer, path in zip(writers, part):
                        writer.append(Path(path))
                for path in part:
                    Path(path).unlink(missing_ok=True)
                stats["series"] += result["series"]
                stats["flagged"] += result["flagged"]
                stats["worker_threads"].add(result["threads"])
                hashes.append(result["ids"])
        _check_each_series_once(np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64), input)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    for writer in writers:
        writer.close()
    stats["worker_threads"] = sorted(stats["worker_threads"])
    return stats


def _client(workers: int, scheduler: str | None):
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    if workers < 1:
        raise SeriesInputError(f"--workers {workers}: must be an integer >= 1")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR)
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
    hashes.sort()
    if len(hashes) > 1 and np.any(hashes[1:] == hashes[:-1]):
        raise SeriesInputError(
            f"--input {input}: the rows of a series are split into separate blocks of the file (in two pieces); "
            "the rows of each series must be contiguous (sort the file by series_id)"
        )
