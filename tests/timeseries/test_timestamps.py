"""Forecast timestamps: each series' own timestamps continued at its own step; irregular series are refused."""

import numpy as np
import pandas as pd
import pytest

from fewshot.cli import main
from fewshot.timeseries.fleet import predict_file
from fewshot.timeseries.timestamps import IrregularTimestamps, future_timestamps


def dates(*texts):
    return pd.to_datetime(list(texts)).to_numpy()


@pytest.mark.parametrize(
    "stamps, expected",
    [
        (np.array([3, 4, 5]), [6, 7, 8]),
        (np.array([1990, 1995, 2000]), [2005, 2010, 2015]),
        (np.array([0.5, 1.0]), [1.5, 2.0, 2.5]),
        (dates("2020-01-31", "2020-02-29", "2020-03-31"), dates("2020-04-30", "2020-05-31", "2020-06-30")),  # month ends
        (dates("2020-01-01", "2020-04-01"), dates("2020-07-01", "2020-10-01", "2021-01-01")),  # quarters
        (dates("2018-06-15", "2019-06-15"), dates("2020-06-15", "2021-06-15", "2022-06-15")),  # years, a fixed day
        (dates("2020-01-31", "2020-02-01"), dates("2020-02-02", "2020-02-03", "2020-02-04")),  # days, not months
        (dates("2020-03-01 23:00", "2020-03-02 00:00"), dates("2020-03-02 01:00", "2020-03-02 02:00", "2020-03-02 03:00")),
        (pd.bdate_range("2024-01-01", "2024-01-12").to_numpy(), dates("2024-01-15", "2024-01-16", "2024-01-17")),  # pandas' inference
    ],
)
def test_timestamps_continue_at_the_series_step(stamps, expected):
    assert list(future_timestamps(["s"], [stamps], 3)) == list(expected)


def test_a_batch_equals_one_series_at_a_time_and_a_single_timestamp_has_no_step():
    rng = np.random.default_rng(0)
    monthly = [pd.date_range("2001-01-31", periods=int(n), freq="ME").to_numpy() for n in rng.integers(0, 30, 40)]
    batch = future_timestamps([f"s{i}" for i in range(40)], monthly, 4)
    one_by_one = np.concatenate([future_timestamps([f"s{i}"], [s], 4) for i, s in enumerate(monthly)])
    np.testing.assert_array_equal(batch, one_by_one)
    for s, future in zip(monthly, batch.reshape(40, 4)):
        if len(s) >= 2:
            assert list(future) == list(pd.date_range(s[-1], periods=5, freq="ME")[1:])
        else:
            assert np.isnat(future).all()
    integers = future_timestamps(["a", "b"], [np.array([7]), np.array([1, 3])], 2)
    assert integers.dtype == "Int64" and integers.isna().tolist() == [True, True, False, False] and list(integers[2:]) == [5, 7]
    zoned = pd.date_range("2020-01-01", periods=3, freq="MS", tz="Europe/Paris").to_numpy(dtype=object)
    assert list(future_timestamps(["z"], [zoned], 1)) == [pd.Timestamp("2020-04-01", tz="Europe/Paris")]


@pytest.mark.parametrize(
    "stamps, message",
    [
        (np.array([1, 2, 4, 5]), r"series 'b': timestamps are not evenly spaced \(2 -> 4 after a step of 1\)"),
        (dates("2020-01-01", "2020-02-01", "2020-04-01"), r"\(2020-02-01 00:00:00 -> 2020-04-01 00:00:00 after a step of 1 months\)"),
    ],
)
def test_irregular_timestamps_are_an_error_naming_the_series(stamps, message):
    regular = stamps[:2]
    with pytest.raises(IrregularTimestamps, match=message):
        future_timestamps(["a", "b"], [regular, stamps], 2)


def test_predict_output_joins_back_on_the_input_timestamps(quarterly_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    quarters = pd.date_range("2005-01-01", periods=40, freq="QS")
    rows = [("q1", t, 50 + i + rng.normal()) for i, t in enumerate(quarters)]
    rows += [("q2", t, 20 + np.sin(i) + rng.normal()) for i, t in enumerate(quarters[5:])]
    source = tmp_path / "in.csv"
    pd.DataFrame(rows, columns=["series_id", "timestamp", "value"]).to_csv(source, index=False)
    out = tmp_path / "out.parquet"
    predict_file(quarterly_run, source, out, horizon=4, frequency="quarterly")
    frame = pd.read_parquet(out)
    assert list(frame.columns[:3]) == ["series_id", "timestamp", "step"]
    assert list(frame.timestamp[frame.series_id == "q1"]) == list(pd.date_range("2015-01-01", periods=4, freq="QS"))
    # the forecast timestamps of one run are the input timestamps of the next: append and forecast again
    extended = pd.concat([pd.read_csv(source, parse_dates=["timestamp"]), frame.rename(columns={"forecast": "value"})[["series_id", "timestamp", "value"]]])
    extended.sort_values(["series_id", "timestamp"]).to_csv(tmp_path / "next.csv", index=False)
    predict_file(quarterly_run, tmp_path / "next.csv", tmp_path / "next.csv.parquet", horizon=2, frequency="quarterly")
    again = pd.read_parquet(tmp_path / "next.csv.parquet")
    assert list(again.timestamp[again.series_id == "q2"]) == list(pd.to_datetime(["2016-01-01", "2016-04-01"]))

    gap = tmp_path / "gap.csv"
    pd.DataFrame(rows[:10] + rows[11:40], columns=["series_id", "timestamp", "value"]).to_csv(gap, index=False)
    assert main(["forecast", "predict", str(quarterly_run), "--input", str(gap), "--output", str(tmp_path / "o.csv")]) == 2
    assert "series 'q1': timestamps are not evenly spaced (2007-04-01 00:00:00 -> 2007-10-01 00:00:00 after a step of 3 months)" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()
