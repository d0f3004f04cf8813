"""Fleet scale: series per second and peak memory of `forecast predict` / `forecast anomalies`, Parquet -> Parquet.

Synthetic but realistic monthly series (level, trend, multiplicative yearly
seasonality, noise; 60 to 144 values each) are written in long format, then
forecast (or scored) by a trained run in a separate process, so the peak
resident memory reported is that of the forecasting process alone.

    PYTHONPATH=. python benchmarks/timeseries_fleet.py generate 10000 /tmp/fleet10k.parquet
    PYTHONPATH=. python benchmarks/timeseries_fleet.py predict runs/m1m3-pooled /tmp/fleet10k.parquet /tmp/out.parquet
    PYTHONPATH=. python benchmarks/timeseries_fleet.py anomalies runs/m1m3-pooled /tmp/fleet10k.parquet /tmp/out.parquet
    PYTHONPATH=. python benchmarks/timeseries_fleet.py vmap runs/m1m3-pooled 512     # batched vs per-series adaptation
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def generate(n: int, path: str, seed: int = 0, per_chunk: int = 20_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, n, per_chunk):
        count = min(per_chunk, n - start)
        lengths = rng.integers(60, 145, count)
        ids, stamps, values = [], [], []
        for i, length in enumerate(lengths):
            t = np.arange(length)
            level = rng.lognormal(5, 1.5)
            trend = rng.normal(0, 0.004) * t
            season = rng.uniform(0, 0.3) * np.sin(2 * np.pi * t / 12 + rng.uniform(0, 2 * np.pi))
            noise = rng.normal(0, rng.uniform(0.01, 0.1), length)
            ids.append(np.full(length, f"s{start + i:08d}"))
            stamps.append(t)
            values.append(level * (1 + trend) * (1 + season) * (1 + noise))
        table = pa.table({"series_id": np.concatenate(ids), "timestamp": np.concatenate(stamps), "value": np.concatenate(values)})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def vmap_speed(run_dir: str, n: int) -> None:
    """Adaptation (2 steps) of n series: one vmapped batch vs a loop over series."""
    from fewshot.timeseries.forecaster import adapt_batched, adapt_one, load_run
    from fewshot.timeseries.windows import history_matrix, make_tasks

    _, models = load_run(run_dir)
    spec, maml = next(iter(models.values()))
    rng = np.random.default_rng(0)
    tasks = make_tasks(history_matrix([100 + np.cumsum(rng.normal(size=100)) for _ in range(n)], spec.lags + spec.windows), spec.lags, spec.horizon)
    adapt_batched(maml, tasks.support_x[:8], tasks.support_y[:8], 2)  # warm-up
    start = time.time()
    adapt_batched(maml, tasks.support_x, tasks.support_y, 2)
    batched = time.time() - start
    start = time.time()
    for i in range(n):
        adapt_one(maml, tasks.support_x[i], tasks.support_y[i], 2)
    looped = time.time() - start
    print(f"batched {n / batched:.0f} series/s, loop {n / looped:.0f} series/s: vmap {looped / batched:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["generate", "predict", "anomalies", "vmap"])
    parser.add_argument("args", nargs="+")
    parser.add_argument("--batch-series", type=int, default=4096)
    args = parser.parse_args()
    if args.mode == "generate":
        generate(int(args.args[0]), args.args[1])
        return
    if args.mode == "vmap":
        vmap_speed(args.args[0], int(args.args[1]))
        return
    from fewshot.timeseries.fleet import anomalies_file, predict_file

    run_dir, source, output = args.args
    run = predict_file if args.mode == "predict" else anomalies_file
    start = time.time()
    stats = run(run_dir, source, output, frequency="monthly", batch_series=args.batch_series)
    seconds = time.time() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.mode}: {stats['series']} series in {seconds:.1f} s = {stats['series'] / seconds:.0f} series/s, "
          f"peak RSS {peak_mib:.0f} MiB, 2,000,000 series: {2e6 / (stats['series'] / seconds) / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
