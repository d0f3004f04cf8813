"""Fleet scale: series per second and peak memory of `forecast predict` / `anomalies` / `monitor`, Parquet -> Parquet.

Synthetic but realistic monthly series (level, trend, multiplicative yearly
seasonality, noise; 60 to 144 values each) are written in long format, then
forecast and/or scored by a trained run in a separate process (or, with
``--workers N``, on a local Dask cluster of N worker processes), so the memory
reported is that of the forecasting processes alone: the peak of the summed
resident memory of this process and its children (Dask's nannies and workers),
sampled every 0.2 s, and the peak of each process. ``--trace FILE`` writes the
sampled total over time (CSV), to see whether it stays flat.

    PYTHONPATH=. python benchmarks/timeseries_fleet.py generate 10000 /tmp/fleet10k.parquet
    PYTHONPATH=. python benchmarks/timeseries_fleet.py predict runs/m1m3-pooled /tmp/fleet10k.parquet /tmp/out.parquet
    PYTHONPATH=. python benchmarks/timeseries_fleet.py anomalies runs/m1m3-pooled /tmp/fleet10k.parquet /tmp/out.parquet
    PYTHONPATH=. python benchmarks/timeseries_fleet.py monitor runs/m1m3-fleet /tmp/fleet10k.parquet /tmp/f.parquet /tmp/a.parquet [--workers 2]
    PYTHONPATH=. python benchmarks/timeseries_fleet.py vmap runs/m1m3-pooled 512     # batched vs per-series adaptation
"""

from __future__ import annotations

import argparse
import resource
import threading
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


class MemorySampler(threading.Thread):
    """Samples the resident memory of this process and its children every ``period`` s: peak total, peak per process."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.me, self.period, self.stop = psutil.Process(), period, threading.Event()
        self.peak_total, self.peak_each, self.cpu_each, self.trace, self.start_time = 0, {}, {}, [], time.time()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for process in [self.me] + self.me.children(recursive=True):
                try:
                    rss = process.memory_info().rss
                    cpu = process.cpu_times()
                    self.cpu_each[process.pid] = cpu.user + cpu.system
                except Exception:  # exited between listing and reading
                    continue
                total += rss
                self.peak_each[process.pid] = max(self.peak_each.get(process.pid, 0), rss)
            self.peak_total = max(self.peak_total, total)
            self.trace.append((round(time.time() - self.start_time, 1), total >> 20))
            self.stop.wait(self.period)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["generate", "predict", "anomalies", "monitor", "vmap"])
    parser.add_argument("args", nargs="+")
    parser.add_argument("--batch-series", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=0, help="Dask local worker processes (0: this process)")
    parser.add_argument("--frequency", default="monthly")
    parser.add_argument("--trace", help="write the sampled total resident memory over time to this CSV")
    args = parser.parse_args()
    if args.mode == "generate":
        generate(int(args.args[0]), args.args[1])
        return
    if args.mode == "vmap":
        vmap_speed(args.args[0], int(args.args[1]))
        return
    import torch

    from fewshot.timeseries.fleet import anomalies_file, monitor_file, predict_file

    sampler = MemorySampler()
    sampler.start()
    start = time.time()
    common = {"frequency": args.frequency, "batch_series": args.batch_series, "workers": args.workers}
    if args.mode == "monitor":
        run_dir, source, forecasts, scores = args.args
        stats = monitor_file(run_dir, source, forecasts, scores, **common)
    else:
        run_dir, source, output = args.args
        stats = (predict_file if args.mode == "predict" else anomalies_file)(run_dir, source, output, **common)
    seconds = time.time() - start
    sampler.stop.set()
    sampler.join()
    own_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    threads = f"{args.workers} Dask workers x {stats.get('worker_threads')} torch thread(s)" if args.workers else f"{torch.get_num_threads()} torch thread(s)"
    each = sorted((v >> 20 for v in sampler.peak_each.values()), reverse=True)
    print(f"{args.mode}: {stats['series']} series in {seconds:.1f} s = {stats['series'] / seconds:.0f} series/s ({threads}), "
          f"peak RSS total {sampler.peak_total / 2**20:.0f} MiB (this process {own_mib:.0f} MiB; per process {each} MiB), "
          f"CPU {sum(sampler.cpu_each.values()):.0f} s, {stats['flagged']} flagged, 2,000,000 series: {2e6 / (stats['series'] / seconds) / 60:.1f} min")  # fmt: skip
    if args.trace:
        with open(args.trace, "w") as out:
            out.write("seconds,rss_total_mib\n" + "".join(f"{t},{m}\n" for t, m in sampler.trace))


if __name__ == "__main__":
    main()
