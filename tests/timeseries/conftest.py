"""A small forecasting run shared by the time-series tests: M1 quarterly -> M3 quarterly, trained once (~10 s).

A short lag window (4) leaves much to learn from the support windows, so adaptation helps clearly.
"""

from __future__ import annotations

import pytest

from fewshot.timeseries import config as tscfg
from fewshot.timeseries.forecaster import train_run


@pytest.fixture(scope="session")
def quarterly_run(tmp_path_factory):
    config = tscfg.ForecastConfig(
        sources=("m1/quarterly",), evaluate_on="m3/quarterly", groups=("quarterly",), lags=(4,), horizons=(8,),
        windows=(24,), hidden=32, iterations=100, val_every=100, meta_batch=16, seed=0,
    )  # fmt: skip
    run_dir = tmp_path_factory.mktemp("quarterly_run")
    train_run(run_dir, config, log=lambda *_: None)
    return run_dir
