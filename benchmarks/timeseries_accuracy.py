"""sMAPE and MASE per frequency and overall on a competition's official test horizons, every method on the same series.

Methods: meta-trained forecasting runs (``fewshot forecast train``), each before
adaptation (0 steps) and after a few steps; the statistical baselines of
benchmarks/timeseries_baselines.py (seasonal naive, statsforecast's AutoETS and
AutoTheta); the published M3 Theta result (Makridakis & Hibon 2000: sMAPE 13.01
over all 3,003 series).

    PYTHONPATH=. python benchmarks/timeseries_accuracy.py runs/m1m3-zeroshot runs/m1m3-global runs/m1m3-pooled \
        --baselines benchmarks/results/timeseries/m3_baselines.npz --steps 0 2 5 \
        --out benchmarks/results/timeseries/m3_accuracy.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fewshot.timeseries.accuracy import mase, smape
from fewshot.timeseries.data import FREQUENCIES
from fewshot.timeseries.forecaster import choose_group, forecast, load_run, select_series

PUBLISHED = {"M3 Theta, published (Makridakis & Hibon 2000)": {"all": 13.01}}


def run_forecasts(run_dir: Path, series, steps: int, detect: bool = False) -> tuple[list[np.ndarray], float]:
    """Forecasts of every series by the run after ``steps`` adaptation steps, and the 95% interval coverage.

    With ``detect`` the model of each series is chosen by its detected seasonal period, not its known frequency.
    """
    _, models = load_run(run_dir)
    specs = [spec for spec, _ in models.values()]
    forecasts, covered, total = [None] * len(series), 0, 0
    by_group: dict[str, list[int]] = {}
    for i, s in enumerate(series):
        by_group.setdefault((choose_group(specs, s.history, None if detect else s.frequency).name, s.horizon), []).append(i)
    for (name, horizon), index in by_group.items():
        spec, maml = models[name]
        result = forecast(maml, spec, [series[i].history for i in index], steps, min(horizon, spec.horizon))
        for j, i in enumerate(index):
            forecasts[i] = result.mean[j]
            actual = series[i].actual[: len(result.mean[j])]
            covered += int(((result.lower[j] <= actual) & (actual <= result.upper[j])).sum())
            total += len(actual)
    return forecasts, covered / max(total, 1)


def scores(series, forecasts) -> dict[str, tuple[float, float]]:
    """frequency (and 'all') -> (mean sMAPE, mean MASE)."""
    out = {}
    for frequency in (*FREQUENCIES, "all"):
        index = [i for i, s in enumerate(series) if frequency in ("all", s.frequency)]
        if index:
            n = [len(forecasts[i]) for i in index]
            out[frequency] = (
                float(np.mean([smape(series[i].actual[:k], forecasts[i]) for i, k in zip(index, n)])),
                float(np.mean([mase(series[i].history, series[i].actual[:k], forecasts[i], series[i].period) for i, k in zip(index, n)])),
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--baselines", type=Path, help=".npz from benchmarks/timeseries_baselines.py")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--detect-period", action="store_true", help="choose each series' model by its detected seasonal period")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config, _ = load_run(args.runs[0])
    series = select_series(config.evaluate_on)
    rows, coverage = {}, {}
    if args.baselines:
        stored = np.load(args.baselines)  # (series, max horizon) per method, NaN-padded
        position = {sid: i for i, sid in enumerate(stored["ids"])}
        for name in ("seasonal_naive", "AutoETS", "AutoTheta"):
            table = stored[name]  # load once: each access of an .npz member decompresses it again
            forecasts = [np.asarray(table[position[s.id]], float) for s in series]
            rows[name] = scores(series, [f[np.isfinite(f)] for f in forecasts])
    for run_dir in args.runs:
        for steps in args.steps:
            name = f"{run_dir.name}, {steps} steps" + (", model by detected period" if args.detect_period else "")
            forecasts, coverage[name] = run_forecasts(run_dir, series, steps, args.detect_period)
            rows[name] = scores(series, forecasts)
            print(name, rows[name]["all"], f"coverage {coverage[name]:.3f}", flush=True)
    frequencies = [f for f in (*FREQUENCIES, "all") if f in next(iter(rows.values()))]
    counts = {f: sum(1 for s in series if f in ("all", s.frequency)) for f in frequencies}
    lines = [
        f"{config.evaluate_on}: sMAPE / MASE (mean over series), official test horizons",
        "",
        "| method | " + " | ".join(f"{f} ({counts[f]})" for f in frequencies) + " | 95% interval coverage |",
        "|---|" + "---:|" * (len(frequencies) + 1),
    ]
    for name, row in rows.items():
        cells = [f"{row[f][0]:.2f} / {row[f][1]:.3f}" for f in frequencies]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {coverage[name]:.3f} |" if name in coverage else f"| {name} | " + " | ".join(cells) + " | |")
    if config.evaluate_on == "m3":
        for name, row in PUBLISHED.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[f]:.2f}" if f in row else "" for f in frequencies) + " | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
