"""Anomaly detection on real labelled series that sktime and aeon bundle (benchmark-only dependencies).

Series (read from the installed packages' data folders; fewshot itself never imports them):

- ``yahoo``: sktime's ``datasets/data/yahoo/yahoo.csv`` (columns ``data, label``), 1,000 values,
  7 labelled point anomalies (a Yahoo Webscope S5 series);
- ``mitdb``: sktime's ``datasets/data/mitdb/mitdb.csv`` (``data, label``), 7,500 ECG samples
  (MIT-BIH arrhythmia database), one labelled segment of 352 samples;
- ``InternalBleeding16``: aeon's ``datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv``
  (``timestamp, value, is_anomaly``), 7,501 values, one labelled segment of 12 values; the UCR
  anomaly archive (Wu & Keogh 2021) gives its first 1,200 values as the anomaly-free train part
  (the ``_TRAIN.csv`` beside it, identical to those values).

Protocol. Each series is scored after a warm-up that no detector scores: the UCR train part,
else the first 20% of the series (no labelled anomaly falls in it). The adapted forecaster scores
the values in consecutive blocks of H (its horizon): for each block it is adapted on the L + K
values before the block and scores the block's values by their standardised one-step residuals
(``fewshot.timeseries.anomalies.forecaster_scores``), as a daily monitoring job would. The
baselines (rolling z-score, window max(2m, 8); seasonal-naive residual) get the period m of the
first autocorrelation peak of the warm-up part (after its first zero crossing), since the
frequency of these series is not given.

Thresholds. Three real series are too few to hold out meta-validation series of their own, so
each detector's threshold is the one chosen on M3 meta-validation series with injected anomalies
(the even-numbered series of ``benchmarks/timeseries_anomalies.py``, best F1 there): it transfers
a standardised score threshold from monthly business data to these series unchanged. Reported
beside it: the best F1 any threshold would reach on the series itself (an oracle, an upper bound,
not a result), the area under the precision-recall curve (threshold-free), and for the two
single-segment series the UCR archive's own score: whether the top-scored value lies within 100
values of the labelled segment.

    pip install sktime aeon   # benchmark only
    PYTHONPATH=. python benchmarks/timeseries_real_anomalies.py runs/m1m3-zeroshot runs/m1m3-pooled \
        --out benchmarks/results/timeseries/real_anomalies.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.timeseries_anomalies import detector_scores, injected
from fewshot.timeseries.anomalies import (
    average_precision,
    best_threshold,
    forecaster_scores,
    precision_recall_f1,
    rolling_zscore,
    seasonal_naive_scores,
)
from fewshot.timeseries.forecaster import choose_group, load_run, select_series

FORECASTER, ZSCORE, SEASONAL = "forecaster (adapted MAML)", "rolling z-score", "seasonal-naive residual"
UCR_TOLERANCE = 100  # Wu & Keogh 2021: a detection counts if it lies within 100 values of the anomaly


@dataclass
class Labelled:
    name: str
    values: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) bool
    warmup: int  # values before this index are never scored
    source: str


# --------------------------------------------------------------------------- loading


def package_data(package: str, *parts: str) -> Path:
    """A file inside an installed package's folder, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{package} is not installed: pip install {package} (a benchmark-only dependency)")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        sys.exit(f"{path}: not in the installed {package} (this benchmark used sktime 1.2.0 and aeon 1.6.0)")
    return path


def load_labelled() -> list[Labelled]:
    import pandas as pd

    out = []
    for name in ("yahoo", "mitdb"):
        path = package_data("sktime", "datasets", "data", name, f"{name}.csv")
        frame = pd.read_csv(path)
        values, labels = frame["data"].to_numpy(float), frame["label"].to_numpy() == 1
        out.append(Labelled(name, values, labels, len(values) // 5, f"sktime {path.name}"))
    folder = ("datasets", "data", "KDD-TSAD_135")
    test = pd.read_csv(package_data("aeon", *folder, "135_UCR_Anomaly_InternalBleeding16_TEST.csv"))
    train = pd.read_csv(package_data("aeon", *folder, "135_UCR_Anomaly_InternalBleeding16_TRAIN.csv"))
    values = test["value"].to_numpy(float)
    assert np.array_equal(values[: len(train)], train["value"].to_numpy(float)), "the UCR train part should open the series"
    out.append(Labelled("InternalBleeding16", values, test["is_anomaly"].to_numpy() == 1, len(train), "aeon UCR 135"))
    for s in out:
        assert not s.labels[: s.warmup].any(), f"{s.name}: a labelled anomaly inside the warm-up"
    return out


def dominant_period(history: np.ndarray, max_lag: int) -> int:
    """The lag of the highest autocorrelation after the first zero crossing (1 if none)."""
    x = history - history.mean()
    lags = np.arange(1, min(max_lag, len(x) // 2))
    acf = np.array([(x[m:] * x[:-m]).sum() for m in lags]) / max((x * x).sum(), 1e-12)
    negative = np.flatnonzero(acf < 0)
    if not len(negative):
        return 1
    after = acf[negative[0]:]
    return int(lags[negative[0] + np.argmax(after)]) if after.max() > 0 else 1


# --------------------------------------------------------------------------- scores


def forecaster_rolling(run_dir: Path, series: Labelled, start: int, end: int, steps: int, windows: int | None = None,
                       clean_above: float = 3.0) -> tuple[np.ndarray, str]:  # fmt: skip
    """(scores of values[start:end], the model), block by block, each block after adapting on the values before it.

    The model is chosen by the seasonal period detected in the warm-up part;
    ``windows``: support windows K per adaptation (default: the model's own K); ``clean_above``:
    ``forecaster_scores``' outlier replacement (inf: none)."""
    _, models = load_run(run_dir)
    spec, maml = models[choose_group([s for s, _ in models.values()], series.values[: series.warmup]).name]
    spec = dataclasses.replace(spec, windows=windows or spec.windows)
    h = spec.horizon
    ends = np.arange(start + h, end + h, h).clip(max=end)  # the last block may overlap the one before: scored again
    scores = np.empty(end - start)
    for last in np.unique(ends - np.maximum(ends - h, start)):
        chosen = [e for e in ends if e - max(e - h, start) == last]
        result = forecaster_scores(maml, spec, [series.values[:e] for e in chosen], int(last), steps, clean_above)
        for e, row in zip(chosen, result.score):
            scores[e - last - start: e - start] = row
    return scores, f"{spec.name}, L = {spec.lags}, H = {h}, K = {spec.windows}"


def baseline_scores(series: Labelled, start: int, end: int, m: int) -> dict[str, np.ndarray]:
    """Scores of values[start:end] (the seasonal-naive spread from the values before ``start``)."""
    values = series.values[:end]
    return {ZSCORE: rolling_zscore(values, end - start, window=max(2 * m, 8)), SEASONAL: seasonal_naive_scores(values, end - start, m)}


def m3_thresholds(run_dir: Path, steps: int, seed: int = 0) -> dict[str, float]:
    """Each detector's best-F1 threshold on the M3 meta-validation series with injected anomalies."""
    series = select_series("m3")
    data = injected(series, seed)
    val = list(range(0, len(series), 2))
    scores = detector_scores(run_dir, [series[i] for i in val], [data[i] for i in val], steps)
    labels = np.concatenate([data[i][1] for i in val])
    names = {"forecaster (adapted MAML)": FORECASTER, "rolling z-score": ZSCORE, "seasonal-naive residual": SEASONAL}
    return {names[k]: best_threshold(labels, np.concatenate(v)) for k, v in scores.items()}


# --------------------------------------------------------------------------- metrics


def cells(threshold: float, labels: np.ndarray, scores: np.ndarray, offset: int, single_segment: bool, full: bool = True) -> str:
    precision, recall, f1 = precision_recall_f1(labels, scores >= threshold)
    segments = np.split(np.flatnonzero(labels), np.flatnonzero(np.diff(np.flatnonzero(labels)) > 1) + 1)
    found = sum(bool((scores[s] >= threshold).any()) for s in segments)
    false = int(((scores >= threshold) & ~labels).sum())
    if not full:
        return f"{threshold:.2f} | {precision:.3f} | {recall:.3f} | {f1:.3f} | {found}/{len(segments)} | {false}"
    oracle = precision_recall_f1(labels, scores >= best_threshold(labels, scores))[2]
    ucr = "n/a"
    if single_segment:
        top, (first, last) = int(np.argmax(scores)), (segments[0][0], segments[0][-1])
        ucr = "yes" if first - UCR_TOLERANCE <= top <= last + UCR_TOLERANCE else f"no (at {top + offset})"
    return (f"{threshold:.2f} | {precision:.3f} | {recall:.3f} | {f1:.3f} | {oracle:.3f} | "
            f"{average_precision(labels, scores):.3f} | {found}/{len(segments)} | {false} | {ucr}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--steps", type=int, help="adaptation steps (default: each run's adapt_steps)")
    parser.add_argument("--windows", type=int, help="support windows K per adaptation (default: each model's own)")
    parser.add_argument("--clean-above", type=float, default=3.0, help="forecaster_scores' outlier replacement threshold (inf: none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    all_series = load_labelled()
    thresholds, runs = {}, {}
    for run_dir in args.run_dirs:
        config, _ = load_run(run_dir)
        runs[run_dir] = config.adapt_steps if args.steps is None else args.steps
        thresholds[run_dir] = m3_thresholds(run_dir, runs[run_dir])
    transferred = [
        "| series | detector | threshold (M3 val) | precision | recall | F1 | best F1 (oracle) | PR-AUC | segments found | false alarms | UCR top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    own = [
        "| series | detector | threshold (max on warm-up) | precision | recall | F1 | segments found | false alarms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in all_series:
        n, calibration = len(s.values), s.warmup // 2  # the warm-up's second half is scored for the own threshold
        labels = s.labels[s.warmup:]
        single = len(np.flatnonzero(np.diff(np.flatnonzero(labels)) > 1)) == 0
        m = dominant_period(s.values[: s.warmup], s.warmup // 2)
        detectors = {}  # name -> (scores after the warm-up, scores of the warm-up's second half, M3 threshold)
        for run_dir, steps in runs.items():
            scores, model = forecaster_rolling(run_dir, s, s.warmup, n, steps, args.windows, args.clean_above)
            warm, _ = forecaster_rolling(run_dir, s, calibration, s.warmup, steps, args.windows, args.clean_above)
            detectors[f"{FORECASTER}, {run_dir.name} ({model}), {steps} steps"] = (scores, warm, thresholds[run_dir][FORECASTER])
        after, warm = baseline_scores(s, s.warmup, n, m), baseline_scores(s, calibration, s.warmup, m)
        for name in after:
            detectors[name] = (after[name], warm[name], thresholds[args.run_dirs[0]][name])
        title = f"{s.name} ({n} values, {int(s.labels.sum())} anomalous, scored after {s.warmup}; m = {m})"
        for name, (scores, warm, threshold) in detectors.items():
            transferred.append(f"| {title} | {name} | {cells(threshold, labels, scores, s.warmup, single)} |")
            own.append(f"| {title} | {name} | {cells(float(warm.max()), labels, scores, s.warmup, single, full=False)} |")
            title = ""
    lines = ["Thresholds chosen on M3 meta-validation series (injected anomalies, best F1):", "", *transferred, "",
             "Thresholds chosen on each series' own anomaly-free warm-up: the highest score of its second half:", "", *own]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
