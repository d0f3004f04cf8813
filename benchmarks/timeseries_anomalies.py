"""Anomaly detection on injected anomalies with known labels, in real competition test horizons.

Half the series (numbers 4k and 4k + 1) get one anomaly (spike, transient level
shift, variance change, or seasonal break for seasonal series, in turn;
``fewshot.timeseries.anomalies.inject``) in their official test part, the other
half stay clean; the train part before it is the history the detectors may
use. Even-numbered series are meta-validation (each detector's threshold is the
one with the best F1 there), odd-numbered ones the test set. Detectors: the
adapted forecaster's standardised one-step residuals, a rolling z-score, the
seasonal-naive residual. Point-wise precision, recall, F1 at the threshold and
average precision (area under the precision-recall curve) on the test series.
The forecaster's threshold is written to RUN_DIR/anomaly.json, where
``fewshot forecast anomalies`` reads it.

    PYTHONPATH=. python benchmarks/timeseries_anomalies.py runs/m1m3-zeroshot --competition m3 \
        --out benchmarks/results/timeseries/m3_anomalies.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fewshot.checkpoint import atomic_write_text
from fewshot.timeseries.anomalies import (
    KINDS,
    average_precision,
    best_threshold,
    forecaster_scores,
    inject,
    precision_recall_f1,
    rolling_zscore,
    seasonal_naive_scores,
)
from fewshot.timeseries.forecaster import choose_group, load_run, select_series
from fewshot.timeseries.fleet import ANOMALY_FILE


def injected(series, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(series):
        kinds = KINDS if s.period > 1 else KINDS[:3]
        kind = kinds[(i // 4) % len(kinds)]
        region, labels = inject(s.history, s.actual, s.period, kind, rng)
        if i % 4 >= 2:  # clean series: even ones validation, odd ones test, like the others
            region, labels, kind = s.actual.astype(float), np.zeros(len(s.actual), dtype=bool), "none"
        out.append((np.concatenate([s.history, region]), labels, kind))
    return out


def detector_scores(run_dir: Path, series, data, steps: int) -> dict[str, list[np.ndarray]]:
    _, models = load_run(run_dir)
    specs = [spec for spec, _ in models.values()]
    scores = {"forecaster (adapted MAML)": [None] * len(series), "rolling z-score": [], "seasonal-naive residual": []}
    by_group: dict[str, list[int]] = {}
    for i, s in enumerate(series):
        by_group.setdefault(choose_group(specs, s.history, s.frequency).name, []).append(i)
    for name, index in by_group.items():
        spec, maml = models[name]
        for last in sorted({len(data[i][1]) for i in index}):  # one horizon at a time
            subset = [i for i in index if len(data[i][1]) == last]
            result = forecaster_scores(maml, spec, [data[i][0] for i in subset], last, steps)
            for j, i in enumerate(subset):
                scores["forecaster (adapted MAML)"][i] = result.score[j]
    for s, (values, labels, _) in zip(series, data):
        last = len(labels)
        scores["rolling z-score"].append(rolling_zscore(values, last, window=max(2 * s.period, 8)))
        scores["seasonal-naive residual"].append(seasonal_naive_scores(values, last, s.period))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--competition", default="m3")
    parser.add_argument("--steps", type=int, help="adaptation steps (default: the run's adapt_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config, _ = load_run(args.run_dir)
    steps = config.adapt_steps if args.steps is None else args.steps
    series = select_series(args.competition)
    data = injected(series, args.seed)
    scores = detector_scores(args.run_dir, series, data, steps)
    val, test = np.arange(0, len(series), 2), np.arange(1, len(series), 2)
    labels = [d[1] for d in data]
    kinds = np.array([d[2] for d in data])
    lines = [
        f"{args.competition}: {len(test)} test series ({len(val)} validation), half with one injected anomaly; "
        f"{int(sum(labels[i].sum() for i in test))} anomalous of {sum(len(labels[i]) for i in test)} test values",
        "",
        "| detector | threshold (val) | precision | recall | F1 | PR-AUC | " + " | ".join(f"recall: {k}" for k in KINDS) + " |",
        "|---|" + "---:|" * (5 + len(KINDS)),
    ]
    for name, per_series in scores.items():
        flat = lambda idx, xs: np.concatenate([xs[i] for i in idx])  # noqa: E731
        threshold = best_threshold(flat(val, labels), flat(val, per_series))
        y, s = flat(test, labels), flat(test, per_series)
        precision, recall, f1 = precision_recall_f1(y, s >= threshold)
        by_kind = []
        for kind in KINDS:
            idx = test[kinds[test] == kind]
            by_kind.append(f"{precision_recall_f1(flat(idx, labels), flat(idx, per_series) >= threshold)[1]:.2f}")
        lines.append(f"| {name} | {threshold:.2f} | {precision:.3f} | {recall:.3f} | {f1:.3f} | {average_precision(y, s):.3f} | " + " | ".join(by_kind) + " |")
        if name.startswith("forecaster"):
            atomic_write_text(args.run_dir / ANOMALY_FILE, json.dumps({"threshold": threshold, "chosen_on": f"{args.competition} even-numbered series, injected anomalies, best F1"}) + "\n")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
