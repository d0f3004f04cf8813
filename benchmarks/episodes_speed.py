"""How fast few-shot episodes are sampled, and what share of a MAML meta-iteration is data.

    .venv/bin/python benchmarks/episodes_speed.py --data-root /work/shared/data --cache-dir /tmp/fscache
    /tmp/peers-venv/bin/python benchmarks/episodes_speed.py --data-root /work/shared/data --cache-dir /tmp/fscache --learn2learn --no-maml

Targets: at least 2,000 episodes/s for Omniglot 5-way 1-shot with 15 queries per
class on ONE core (``torch.set_num_threads(1)``) from the decoded cache, and data
loading under 5% of a MAML meta-iteration.

1. Episodes/s of ``EpisodeSampler.sample(meta_batch, g)`` on the Omniglot train
   split (with rotations, 4,400 classes) for 5-way 1-shot 15 queries (meta-batch
   32) and 20-way 5-shot 5 queries (meta-batch 16), one thread; and separately
   its two parts, ``sample_indices`` (which examples) and ``load`` (the images,
   drawn from a pool of pre-sampled index sets so the same rows are not reloaded).
2. ``--learn2learn``: the same for learn2learn's idiom, ``MetaDataset`` over a
   ``TensorDataset`` of the same cached images (float, (N, 1, 28, 28)) of the
   train characters without rotations, ``TaskDataset([NWays, KShots(k + q),
   LoadData, RemapLabels], num_tasks=-1)``, timing ``taskset.sample()`` (one
   episode a call); compared with our sampler over the same characters without
   rotations (``load_omniglot(rotations=False)``). Also learn2learn's episodes
   split into support/query and stacked into a meta-batch, which is what
   ``EpisodeSampler.sample`` returns. Every measurement is interleaved with ours,
   round by round, in the same process.
3. The data share of a MAML meta-iteration, 5-way 1-shot, meta-batch 32, second
   order, ``Conv4(5)``, inner lr 0.4, 1 step, Adam 1e-3, on 2 threads: sample a
   batch + ``meta_loss`` + backward + Adam step, after a warm-up iteration.

Every rate is measured ``--repeats`` times (rounds interleaved across samplers and
configs) and reported as median and range; the CPU-time rate (``time.process_time``)
is printed beside the wall-clock one, since the machine is shared. Prints markdown
tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from fewshot.tasks.base import TaskBatch
from fewshot.tasks.episodes import EpisodeSampler
from fewshot.tasks.omniglot import character_splits, load_omniglot, omniglot_tasks

CONFIGS = {  # name: (n_way, k_shot, q_queries, meta_batch)
    "5-way 1-shot 15q": (5, 1, 15, 32),
    "20-way 5-shot 5q": (20, 5, 5, 16),
}
TARGET_EPISODES_PER_S = 2000
TARGET_DATA_SHARE = 0.05


def measure(fn, episodes_per_call: int, seconds: float) -> dict:
    """Call ``fn`` for at least ``seconds``; episodes per wall second and per CPU second."""
    for _ in range(3):  # warm-up
        fn()
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        calls += 1
        wall = time.perf_counter() - wall0
        if wall >= seconds:
            break
    cpu = time.process_time() - cpu0
    episodes = calls * episodes_per_call
    return {"eps": episodes / wall, "eps_cpu": episodes / cpu, "episodes": episodes, "wall_s": wall, "loadavg1": os.getloadavg()[0]}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def cycle(items):
    state = {"i": 0}

    def next_item():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return next_item


def sampler_measurements(label: str, sampler: EpisodeSampler, meta_batch: int, seed: int, split: bool) -> dict:
    """name -> (fn, episodes per call) for one of our samplers."""
    g = torch.Generator().manual_seed(seed)
    out = {label: (lambda: sampler.sample(meta_batch, g), meta_batch)}
    if split:
        pool = [sampler.sample_indices(meta_batch, torch.Generator().manual_seed(seed + 1 + i)) for i in range(64)]
        next_episodes = cycle(pool)
        g_idx = torch.Generator().manual_seed(seed + 1000)
        out[label + ": sample_indices"] = (lambda: sampler.sample_indices(meta_batch, g_idx), meta_batch)
        out[label + ": load"] = (lambda: sampler.load(next_episodes()), meta_batch)
    return out


def l2l_measurements(l2l, images: torch.Tensor, labels: torch.Tensor, n: int, k: int, q: int, meta_batch: int, seed: int) -> tuple[dict, float]:
    """learn2learn's idiom over a TensorDataset; returns the measurements and the setup time."""
    from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels

    start = time.perf_counter()
    meta_ds = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
    taskset = l2l.data.TaskDataset(
        meta_ds, task_transforms=[NWays(meta_ds, n), KShots(meta_ds, k + q), LoadData(meta_ds), RemapLabels(meta_ds)], num_tasks=-1
    )
    setup_s = time.perf_counter() - start
    import random

    random.seed(seed)  # learn2learn draws from Python's random
    x, y = taskset.sample()
    assert x.shape == (n * (k + q), 1, 28, 28) and sorted(y.tolist()) == sorted(list(range(n)) * (k + q)), (x.shape, y)

    def batch() -> TaskBatch:
        """meta_batch episodes split into support/query by class and stacked, as EpisodeSampler.sample returns."""
        sx, sy, qx, qy = [], [], [], []
        for _ in range(meta_batch):
            x, y = taskset.sample()
            order = torch.argsort(y, stable=True)
            x, y = x[order].view(n, k + q, *x.shape[1:]), y[order].view(n, k + q)
            sx.append(x[:, :k].reshape(n * k, *x.shape[2:]))
            qx.append(x[:, k:].reshape(n * q, *x.shape[2:]))
            sy.append(y[:, :k].reshape(-1))
            qy.append(y[:, k:].reshape(-1))
        return TaskBatch(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy))

    return {"learn2learn: taskset.sample()": (taskset.sample, 1), "learn2learn: + split + stack": (batch, meta_batch)}, setup_s


def maml_share(args, rates_5w1s: dict) -> dict:
    """Data time / iteration time of second-order MAML, 5-way 1-shot, on ``--maml-threads`` threads."""
    from fewshot.algorithms.maml import MAML
    from fewshot.models.conv import Conv4

    torch.set_num_threads(args.maml_threads)
    torch.manual_seed(0)
    sampler = omniglot_tasks("train", 5, 1, 15, args.data_root, args.cache_dir)
    g = torch.Generator().manual_seed(0)
    maml = MAML(Conv4(5), F.cross_entropy, inner_lr=0.4, inner_steps=1, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    iterations = []
    for i in range(args.maml_warmup + args.maml_iterations):
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        tasks = sampler.sample(32, g)
        t1 = time.perf_counter()
        loss = maml.meta_loss(tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        row = {"data_s": t1 - t0, "iter_s": t2 - t0, "share": (t1 - t0) / (t2 - t0), "loss": loss.item(), "loadavg1": load0}
        print(f"# MAML iteration {i}{' (warm-up)' if i < args.maml_warmup else ''}: {json.dumps(row)}", flush=True)
        if i >= args.maml_warmup:
            iterations.append(row)
    iter_s = summary([r["iter_s"] for r in iterations])
    one_core_data_s = 32 / rates_5w1s["median"]  # sampling time of a batch at the one-thread rate measured above
    return {
        "threads": args.maml_threads,
        "batched": maml.batched,
        "iterations": iterations,
        "iter_s": iter_s,
        "data_ms": summary([1000 * r["data_s"] for r in iterations]),
        "share": summary([r["share"] for r in iterations]),
        "share_one_core_rate": one_core_data_s / iter_s["median"],
    }


def fmt_range(s: dict, scale: float = 1.0, digits: int = 0) -> str:
    return f"{s['min'] * scale:,.{digits}f}-{s['max'] * scale:,.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="folder with omniglot/*.zip (default: $FEWSHOT_DATA)")
    parser.add_argument("--cache-dir", default=None, help="decoded cache (default: $FEWSHOT_CACHE)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every measurement")
    parser.add_argument("--learn2learn", action="store_true", help="also learn2learn's MetaDataset/TaskDataset idiom")
    parser.add_argument("--no-maml", action="store_true", help="skip the MAML data-share measurement")
    parser.add_argument("--maml-threads", type=int, default=2)
    parser.add_argument("--maml-warmup", type=int, default=1)
    parser.add_argument("--maml-iterations", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    loadavg_start = os.getloadavg()
    collection = load_omniglot(args.data_root, args.cache_dir)  # builds the cache on first use
    np.asarray(collection.images).sum()  # page the memory-mapped cache in
    l2l = None
    if args.learn2learn:
        import learn2learn as l2l

        plain = load_omniglot(args.data_root, args.cache_dir, rotations=False)
        train_chars = character_splits()["train"]
        keep = torch.isin(plain.characters, torch.tensor(train_chars))
        images = torch.from_numpy(np.asarray(plain.images)[keep.numpy()]).float().div_(255.0).unsqueeze(1)
        labels = plain.characters[keep]

    measurements: dict[str, dict] = {}  # config -> name -> (fn, episodes per call)
    setup = {}
    for c, (config, (n, k, q, mb)) in enumerate(CONFIGS.items()):
        ms = sampler_measurements("fewshot (rotations)", omniglot_tasks("train", n, k, q, args.data_root, args.cache_dir), mb, 10 * c, split=True)
        if l2l is not None:
            ms.update(sampler_measurements("fewshot (no rotations)", EpisodeSampler(plain, train_chars, n, k, q), mb, 10 * c + 5, split=False))
            l2l_ms, setup[config] = l2l_measurements(l2l, images, labels, n, k, q, mb, seed=c)
            ms.update(l2l_ms)
        measurements[config] = ms

    runs: dict[str, dict[str, list[dict]]] = {config: {name: [] for name in ms} for config, ms in measurements.items()}
    for r in range(args.repeats):
        print(f"# round {r + 1}/{args.repeats}, load average {os.getloadavg()}", flush=True)
        for config, ms in measurements.items():
            for name, (fn, per_call) in ms.items():
                runs[config][name].append(measure(fn, per_call, args.seconds))

    results = {}
    for config, by_name in runs.items():
        results[config] = {
            name: {"eps": summary([m["eps"] for m in ms]), "eps_cpu": summary([m["eps_cpu"] for m in ms]), "loadavg1": [m["loadavg1"] for m in ms]}
            for name, ms in by_name.items()
        }

    print(f"\ntorch {torch.__version__}, sampling on {torch.get_num_threads()} thread, {os.cpu_count()} CPUs, "
          f"{args.repeats} rounds of {args.seconds:g} s per measurement\n")
    print("| config | sampler | episodes/s (median) | range | CPU-time episodes/s (median) | µs/episode |")
    print("|---|---|---:|---|---:|---:|")
    for config, by_name in results.items():
        for name, res in by_name.items():
            e = res["eps"]
            print(f"| {config} | {name} | {e['median']:,.0f} | {fmt_range(e)} | {res['eps_cpu']['median']:,.0f} | {1e6 / e['median']:,.1f} |")

    print("\n| config | part of `sample` | µs/episode (median) | range | share of the parts |")
    print("|---|---|---:|---|---:|")
    for config, by_name in results.items():
        parts = {p: by_name[f"fewshot (rotations): {p}"]["eps"] for p in ("sample_indices", "load")}
        us = {p: {"median": 1e6 / s["median"], "min": 1e6 / s["max"], "max": 1e6 / s["min"]} for p, s in parts.items()}
        total = sum(u["median"] for u in us.values())
        for p, u in us.items():
            print(f"| {config} | `{p}` | {u['median']:,.1f} | {fmt_range(u, digits=1)} | {u['median'] / total:.0%} |")
        print(f"| {config} | (`sample`, end to end) | {1e6 / by_name['fewshot (rotations)']['eps']['median']:,.1f} | | |")

    maml = None
    if not args.no_maml:
        print(flush=True)
        maml = maml_share(args, results["5-way 1-shot 15q"]["fewshot (rotations)"]["eps"])
        print("\n| MAML 5-way 1-shot, meta-batch 32, 2nd order, Conv4, 2 threads | median | range |")
        print("|---|---:|---|")
        print(f"| iteration (sample + meta_loss + backward + Adam), s | {maml['iter_s']['median']:.2f} | {fmt_range(maml['iter_s'], digits=2)} |")
        print(f"| data (`sampler.sample(32)`), ms | {maml['data_ms']['median']:.1f} | {fmt_range(maml['data_ms'], digits=1)} |")
        print(f"| data share | {maml['share']['median']:.2%} | {fmt_range(maml['share'], 100, 2)} % |")
        print(f"| data share at the one-thread sampling rate above | {maml['share_one_core_rate']:.2%} | |")

    eps_5w1s = results["5-way 1-shot 15q"]["fewshot (rotations)"]["eps"]["median"]
    print(f"\ntarget >= {TARGET_EPISODES_PER_S} episodes/s (5-way 1-shot 15q, 1 thread): {eps_5w1s:,.0f} -> "
          f"{'met' if eps_5w1s >= TARGET_EPISODES_PER_S else 'NOT met'}")
    if maml:
        print(f"target data share < {TARGET_DATA_SHARE:.0%}: {maml['share']['median']:.2%} -> "
              f"{'met' if maml['share']['median'] < TARGET_DATA_SHARE else 'NOT met'}")
    print(json.dumps({
        "benchmark": "episodes_speed",
        "torch": torch.__version__,
        "learn2learn": getattr(l2l, "__version__", None),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "l2l_setup_s": setup,
        "episodes": results,
        "maml": maml,
    }))


if __name__ == "__main__":
    main()
