import numpy as np
import pandas as pd
import pytest

from fewshot.cli import main
from fewshot.timeseries.data import write_long
from fewshot.timeseries.fleet import anomalies_file, predict_file


def seasonal_series(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(60)
    return [50 + 0.2 * t + 5 * np.sin(2 * np.pi * t / 4 + rng.uniform(0, 6)) + rng.normal(0, 1, 60) for _ in range(n)]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_streaming_in_chunks_equals_one_batch(quarterly_run, tmp_path, suffix):
    values = seasonal_series(23)
    values[5] = values[5][:3]  # shorter than the lag window: naive
    source = tmp_path / f"in.{suffix}"
    write_long(source, [f"s{i:02d}" for i in range(23)], values)
    predict_file(quarterly_run, source, tmp_path / f"a.{suffix}", chunk_rows=50, batch_series=4, frequency="quarterly")
    predict_file(quarterly_run, source, tmp_path / f"b.{suffix}", chunk_rows=10**6, batch_series=10**6, frequency="quarterly")
    read = pd.read_parquet if suffix == "parquet" else pd.read_csv
    a, b = read(tmp_path / f"a.{suffix}"), read(tmp_path / f"b.{suffix}")
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)
    assert len(a) == 23 * 8 and (a[a.series_id == "s05"].method == "naive (short)").all()


def test_cli_predict_anomalies_and_plot(quarterly_run, tmp_path, capsys):
    values = seasonal_series(5)
    values[0][-3] += 40  # a spike among the scored values
    source = tmp_path / "in.csv"
    write_long(source, [f"s{i}" for i in range(5)], values)
    out = tmp_path / "forecast.parquet"
    assert main(["forecast", "predict", str(quarterly_run), "--input", str(source), "--output", str(out), "--horizon", "4", "--plot", str(tmp_path / "f.png")]) == 0
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["series_id", "timestamp", "step", "forecast", "lower", "upper", "method", "n_filled"]
    assert len(frame) == 20 and (tmp_path / "f.png").stat().st_size > 1000
    flagged = tmp_path / "anomalies.csv"
    assert main(["forecast", "anomalies", str(quarterly_run), "--input", str(source), "--output", str(flagged), "--plot", str(tmp_path / "a.png")]) == 0
    scores = pd.read_csv(flagged)
    top = scores.loc[scores.score.idxmax()]
    assert top.series_id == "s0" and top.timestamp == 57 and top.anomaly


def test_cli_bad_input_exits_2(quarterly_run, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"series_id": ["a"], "time": [1], "value": [1.0]}).to_csv(bad, index=False)
    args = ["forecast", "predict", str(quarterly_run), "--input", str(bad), "--output", str(tmp_path / "o.csv")]
    assert main(args) == 2
    assert "missing column timestamp" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()  # nothing half-written
    good = tmp_path / "good.csv"
    write_long(good, ["a"], seasonal_series(1))
    assert main(["forecast", "predict", str(quarterly_run), "--input", str(good), "--output", str(tmp_path / "o.csv"), "--horizon", "99"]) == 2
    assert "--horizon 99: must be at most 8" in capsys.readouterr().err
    assert main(["forecast", "predict", str(tmp_path / "norun"), "--input", str(good), "--output", str(tmp_path / "o.csv")]) == 2
    assert main(["forecast", "train", "nope"]) == 2
    with pytest.raises(SystemExit) as exit:
        main(["forecast", "predict", str(quarterly_run), "--input", str(good), "--output", "x.csv", "--frequency", "hourly"])
    assert exit.value.code == 2


def test_cli_steps_zero_is_allowed_negative_is_not(quarterly_run, tmp_path, capsys):
    good = tmp_path / "good.csv"
    write_long(good, ["a"], seasonal_series(1))
    out = tmp_path / "o.csv"
    assert main(["forecast", "predict", str(quarterly_run), "--input", str(good), "--output", str(out), "--steps", "0"]) == 0
    assert main(["forecast", "predict", str(quarterly_run), "--input", str(good), "--output", str(out), "--steps", "-1"]) == 2
    assert "--steps -1: must be an integer >= 0" in capsys.readouterr().err
