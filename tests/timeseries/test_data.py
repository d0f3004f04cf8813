import numpy as np
import pandas as pd
import pytest

from fewshot.tasks.data_root import DataError
from fewshot.timeseries.data import SeriesInputError, fill_gaps, load_competition, read_long, write_long


def test_competitions_have_their_official_splits():
    m3 = load_competition("m3")
    assert len(m3) == 3003 and len(load_competition("m1")) == 1001 and len(load_competition("tourism")) == 1311
    horizons = {s.frequency: s.horizon for s in m3}
    assert horizons == {"yearly": 6, "quarterly": 8, "monthly": 18, "other": 8}
    assert all(len(s.actual) == s.horizon for s in m3)
    assert m3[0].id == "m3:N0001" and m3[0].history[0] == 940.66 and len(m3[0].history) == 14
    assert {s.horizon for s in load_competition("tourism", "monthly")} == {24}
    with pytest.raises(SeriesInputError, match="competition must be one of m1, m3, tourism"):
        load_competition("m4")


def read_all(path, **kwargs):
    blocks = list(read_long(path, **kwargs))
    return [i for b in blocks for i in b.ids], [v for b in blocks for v in b.values], np.concatenate([b.n_filled for b in blocks])


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_chunked_reading_equals_one_chunk(tmp_path, suffix):
    rng = np.random.default_rng(0)
    values = [rng.normal(size=int(n)) for n in rng.integers(1, 30, size=25)]
    path = tmp_path / f"long.{suffix}"
    write_long(path, [f"s{i}" for i in range(25)], values)
    ids, read, _ = read_all(path, chunk_rows=7, batch_series=3)
    ids1, read1, _ = read_all(path, chunk_rows=10**6, batch_series=10**6)
    assert ids == ids1 == [f"s{i}" for i in range(25)]
    for a, b, c in zip(read, read1, values):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_rows_of_a_series_in_any_order_are_sorted_by_timestamp(tmp_path):
    path = tmp_path / "x.csv"
    pd.DataFrame({"series_id": ["a", "a", "a"], "timestamp": ["2024-03-01", "2024-01-01", "2024-02-01"], "value": [3, 1, 2]}).to_csv(path, index=False)
    block = next(read_long(path))
    assert block.values[0].tolist() == [1, 2, 3]


def write(tmp_path, frame, name="bad.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("name", ["bad.csv", "bad.parquet"])
def test_missing_column(tmp_path, name):
    path = write(tmp_path, pd.DataFrame({"series_id": ["a"], "time": [1], "value": [1.0]}), name)
    with pytest.raises(SeriesInputError, match="missing column timestamp"):
        list(read_long(path))


def test_non_numeric_value(tmp_path):
    path = write(tmp_path, pd.DataFrame({"series_id": ["a", "b", "b"], "timestamp": [1, 1, 2], "value": ["1.5", "2", "abc"]}))
    with pytest.raises(SeriesInputError, match="value must hold numbers; series 'b' has 'abc'"):
        list(read_long(path))


def test_duplicate_timestamp(tmp_path):
    path = write(tmp_path, pd.DataFrame({"series_id": ["a", "a", "a"], "timestamp": [1, 2, 2], "value": [1.0, 2, 3]}))
    with pytest.raises(SeriesInputError, match="series 'a': duplicate timestamp 2"):
        list(read_long(path))


def test_series_split_into_two_blocks(tmp_path):
    path = write(tmp_path, pd.DataFrame({"series_id": ["a", "b", "a"], "timestamp": [1, 1, 2], "value": [1.0, 2, 3]}))
    with pytest.raises(SeriesInputError, match="series_id 'a': its rows are split"):
        list(read_long(path, chunk_rows=1))


def test_nan_gaps_are_interpolated_and_counted(tmp_path):
    frame = pd.DataFrame({"series_id": ["a"] * 6 + ["b"], "timestamp": [1, 2, 3, 4, 5, 6, 1], "value": [np.nan, 1, np.nan, np.nan, 4, np.nan, np.nan]})
    ids, values, filled = read_all(write(tmp_path, frame))
    assert values[0].tolist() == [1, 2, 3, 4] and filled.tolist() == [2, -1] and len(values[1]) == 0
    assert fill_gaps(np.array([1.0, 2.0]))[2] == 0


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_long(tmp_path / "none.csv"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(SeriesInputError, match="must end in .csv or .parquet"):
        list(read_long(tmp_path / "x.json"))
