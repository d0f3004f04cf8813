"""Statistical baselines on a competition's official test horizons: seasonal naive, AutoETS, AutoTheta.

Writes the forecasts (one row per series and method) to a .npz beside the
results, read by benchmarks/timeseries_accuracy.py, which scores every method on
the same series. AutoETS and AutoTheta are statsforecast's (a benchmark-only
dependency: pip install statsforecast).

    OMP_NUM_THREADS=1 python benchmarks/timeseries_baselines.py m3 --out benchmarks/results/timeseries/m3_baselines.npz
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fewshot.timeseries.accuracy import seasonal_naive
from fewshot.timeseries.data import FREQUENCIES, load_competition


def statsforecast_forecasts(series, period: int) -> dict[str, np.ndarray]:
    import pandas as pd
    from statsforecast import StatsForecast
    from statsforecast.models import AutoETS, AutoTheta

    frame = pd.DataFrame(
        {
            "unique_id": np.repeat([s.id for s in series], [len(s.history) for s in series]),
            "ds": np.concatenate([np.arange(len(s.history)) for s in series]),
            "y": np.concatenate([s.history for s in series]),
        }
    )
    horizon = series[0].horizon
    models = [AutoETS(season_length=period), AutoTheta(season_length=period)]
    result = StatsForecast(models=models, freq=1, n_jobs=1).forecast(df=frame, h=horizon)
    result = result.reset_index() if "unique_id" not in result.columns else result
    out = {}
    for name in ("AutoETS", "AutoTheta"):
        per_series = {sid: group[name].to_numpy() for sid, group in result.groupby("unique_id", sort=False)}
        out[name] = [per_series[s.id] for s in series]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("competition", choices=["m1", "m3", "tourism"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ids, methods = [], {"seasonal_naive": [], "AutoETS": [], "AutoTheta": []}
    for frequency in FREQUENCIES:
        series = load_competition(args.competition, frequency)
        if not series:
            continue
        start = time.time()
        ids += [s.id for s in series]
        methods["seasonal_naive"] += [seasonal_naive(s.history, s.horizon, s.period) for s in series]
        for name, forecasts in statsforecast_forecasts(series, series[0].period).items():
            methods[name] += list(forecasts)
        print(f"{frequency}: {len(series)} series in {time.time() - start:.0f} s", flush=True)
    width = max(len(f) for f in methods["seasonal_naive"])
    padded = {k: np.stack([np.pad(np.asarray(f, np.float64), (0, width - len(f)), constant_values=np.nan) for f in v]) for k, v in methods.items()}
    np.savez_compressed(args.out, ids=np.asarray(ids), **padded)  # (series, max horizon), NaN after each horizon
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
