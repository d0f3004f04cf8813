"""Fleet scale: one pass that forecasts and scores, the Dask engine, reading in bounded memory."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewshot.cli import main
from fewshot.timeseries.data import SeriesInputError, read_long, write_long
from fewshot.timeseries.fleet import anomalies_file, monitor_file, predict_file

from tests.timeseries.test_fleet import seasonal_series


def fleet(tmp_path, n=40, name="fleet.parquet", row_group_size=None):
    """n quarterly series of 30 to 90 values (a spike in some), two too short to forecast or score, long format."""
    rng = np.random.default_rng(1)
    values = [v[: rng.integers(30, 61)] for v in seasonal_series(n)]
    for v in values[::7]:
        v[-2] += 30  # a spike among the scored values
    values[3], values[17] = values[3][:3], values[17][:9]  # naive forecast; too short to score
    ids = [f"s{i:03d}" for i in range(n)]
    path = tmp_path / name
    if row_group_size is None:
        write_long(path, ids, values)
    else:
        lengths = [len(v) for v in values]
        table = pa.table({"series_id": np.repeat(ids, lengths), "timestamp": np.concatenate([np.arange(k) for k in lengths]),
                          "value": np.concatenate(values)})  # fmt: skip
        pq.write_table(table, path, row_group_size=row_group_size)
    return path


def read(path):
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_monitor_equals_predict_plus_anomalies(quarterly_run, tmp_path, suffix):
    source = fleet(tmp_path, name=f"in.{suffix}")
    stats = monitor_file(quarterly_run, source, tmp_path / f"f.{suffix}", tmp_path / f"a.{suffix}", horizon=6, last=5, batch_series=7, chunk_rows=100)
    predict_file(quarterly_run, source, tmp_path / f"p.{suffix}", horizon=6)
    flagged = anomalies_file(quarterly_run, source, tmp_path / f"s.{suffix}", last=5)["flagged"]
    pd.testing.assert_frame_equal(read(tmp_path / f"f.{suffix}"), read(tmp_path / f"p.{suffix}"), check_exact=True)
    pd.testing.assert_frame_equal(read(tmp_path / f"a.{suffix}"), read(tmp_path / f"s.{suffix}"), check_exact=True)
    scores = read(tmp_path / f"a.{suffix}")
    assert stats["series"] == 40 and stats["flagged"] == flagged == scores.anomaly.sum() > 0
    assert len(read(tmp_path / f"f.{suffix}")) == 40 * 6 and len(scores) == 38 * 5 + 2  # s003, s017: one row, no score


@pytest.fixture(scope="module")
def dask_scheduler():
    import logging

    from dask import distributed  # in the test extra

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR) as cluster:
        yield cluster.scheduler_address


def test_dask_two_workers_equals_one_process(quarterly_run, tmp_path, dask_scheduler):
    source = fleet(tmp_path, row_group_size=97)  # several row groups, series across their boundaries
    one = monitor_file(quarterly_run, source, tmp_path / "f1.parquet", tmp_path / "a1.parquet")
    # pieces of 150 rows: many series cut by a piece boundary
    dask = monitor_file(quarterly_run, source, tmp_path / "f2.parquet", tmp_path / "a2.parquet", batch_series=5, chunk_rows=150, scheduler=dask_scheduler)
    assert dask["pieces"] == -(-pq.ParquetFile(source).metadata.num_rows // 150) >= 10 and dask["series"] == one["series"] == 40 and dask["flagged"] == one["flagged"]
    for a, b in (("f1", "f2"), ("a1", "a2")):  # b: a Parquet dataset, one part per piece that starts a series
        assert (tmp_path / f"{b}.parquet").is_dir() and pq.read_table(tmp_path / f"{a}.parquet").equals(pq.read_table(tmp_path / f"{b}.parquet"))
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{a}.parquet"), pd.read_parquet(tmp_path / f"{b}.parquet"), check_exact=True)
    monitor_file(quarterly_run, source, tmp_path / "f2.parquet", tmp_path / "a2.parquet")  # one process over a dataset: one file again
    assert pq.read_table(tmp_path / "f2.parquet").equals(pq.read_table(tmp_path / "f1.parquet")) and (tmp_path / "f2.parquet").is_file()
    anomalies_file(quarterly_run, source, tmp_path / "a3.csv", chunk_rows=150, scheduler=dask_scheduler)  # CSV: one file, parts appended
    anomalies_file(quarterly_run, source, tmp_path / "a4.csv")
    assert (tmp_path / "a3.csv").read_bytes() == (tmp_path / "a4.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no part or temporary file left


def test_dask_split_series_is_an_error(quarterly_run, tmp_path, dask_scheduler):
    values = seasonal_series(3)
    source = tmp_path / "split.parquet"
    write_long(source, ["a", "b", "a"], values)  # series a in two blocks, which land in different pieces
    with pytest.raises(SeriesInputError, match="series_id 'a': its rows are split into separate blocks"):
        predict_file(quarterly_run, source, tmp_path / "o.parquet", chunk_rows=60, scheduler=dask_scheduler)
    assert not (tmp_path / "o.parquet").exists()


def read_in_blocks(path, n_series, length=100):
    """Write n_series series of ``length`` values in row groups of 5,000 rows, read them back; (block sizes, peak Arrow bytes)."""
    rng = np.random.default_rng(0)
    table = pa.table({"series_id": np.repeat([f"series{i:06d}" for i in range(n_series)], length),
                      "timestamp": np.tile(np.arange(length), n_series), "value": rng.normal(size=n_series * length)})  # fmt: skip
    pq.write_table(table, path, row_group_size=5000)
    del table
    base, peak, sizes = pa.total_allocated_bytes(), 0, []
    for block in read_long(path, chunk_rows=5000, batch_series=50):
        sizes.append(len(block.ids))
        peak = max(peak, pa.total_allocated_bytes() - base)
    return sizes, peak


def test_reading_is_chunked_and_memory_does_not_grow_with_the_file(tmp_path):
    """Blocks of at most batch_series series; the same peak Arrow memory for 4 row groups as for 80.

    (With the Parquet reader's default pre-buffering, every row group read stayed in memory to the end:
    the peak grew with the file, 7x here, and to 0.8 GB for a million series.)"""
    small_sizes, small_peak = read_in_blocks(tmp_path / "small.parquet", 200)
    sizes, peak = read_in_blocks(tmp_path / "big.parquet", 4000)
    assert sum(sizes) == 4000 and max(sizes) == 50 and sum(small_sizes) == 200
    assert peak <= 1.2 * small_peak, (peak, small_peak)


def test_cli_monitor_and_its_bad_arguments(quarterly_run, tmp_path, capsys):
    source = fleet(tmp_path, n=20)
    args = ["forecast", "monitor", str(quarterly_run), "--input", str(source)]
    assert main(args + ["--forecast", str(tmp_path / "f.csv"), "--anomalies", str(tmp_path / "a.parquet"), "--last", "3"]) == 0
    assert "forecast and scored 20 series" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "f.csv")) == 20 * 8 and len(pd.read_parquet(tmp_path / "a.parquet")) == 19 * 3 + 1  # s003: too short
    bad = {
        ("--forecast", "f.txt", "--anomalies", "a.csv"): "--forecast",
        ("--forecast", "f.csv", "--anomalies", "f.csv"): "--anomalies",
        ("--forecast", "f.csv", "--anomalies", "a.csv", "--workers", "-1"): "--workers -1: must be an integer >= 0",
        ("--forecast", "f.csv", "--anomalies", "a.csv", "--workers", "2", "--scheduler", "tcp://x:1"): "give one of them",
        ("--forecast", "f.csv", "--anomalies", "a.csv", "--last", "0"): "--last 0",
        ("--forecast", "f.csv", "--anomalies", "a.csv", "--horizon", "9"): "--horizon 9",
    }
    for extra, message in bad.items():
        assert main(args + [str(tmp_path / e) if e.endswith(("csv", "txt")) else e for e in extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # --workers 2: a local cluster of its own, the same tables
    assert main(args + ["--forecast", str(tmp_path / "fw.parquet"), "--anomalies", str(tmp_path / "aw.parquet"), "--last", "3", "--workers", "2"]) == 0
    assert "forecast and scored 20 series" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "fw.parquet"), pd.read_csv(tmp_path / "f.csv"), check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "aw.parquet"), pd.read_parquet(tmp_path / "a.parquet"), check_exact=True)
    csv = tmp_path / "in.csv"
    write_long(csv, ["a"], seasonal_series(1))
    assert main(["forecast", "monitor", str(quarterly_run), "--input", str(csv), "--forecast", str(tmp_path / "x.csv"),
                 "--anomalies", str(tmp_path / "y.csv"), "--workers", "2"]) == 2  # fmt: skip
    assert "--input" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()
