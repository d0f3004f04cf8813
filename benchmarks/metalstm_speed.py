"""Meta-LSTM speed and memory: ms per meta-training and meta-test episode, peak memory, one thread.

    OMP_NUM_THREADS=1 python benchmarks/metalstm_speed.py [--repeats 5] [--only NAME]

For each setting (the presets' learners: Omniglot 28x28 strided Conv4, miniImageNet
84x84 max-pool Conv4, both 32 filters, 5-way, 15 queries per class; images are
random, which does not change the cost), in a fresh process each:

- meta-train episode: ``training_loss`` (T learner updates on the support set, the
  query loss, its meta-gradient, clipping) + backward + Adam step;
- meta-test episode: ``episode(task, T)`` (T updates, query predictions after each);
- the meta-learner's update alone, all P coordinates at once (forward);
- memory: bytes the autograd graph of one meta-training episode saves for backward
  (``saved_tensors_hooks``), and the process's peak resident memory growth over the
  run (``ru_maxrss`` after, minus the resident size before the first episode).

Timings: median and range over ``--repeats`` rounds after a warm-up, wall-clock and
process CPU time (the machine is shared: CPU time is the steadier one). Prints a
markdown table and one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SETTINGS = {
    "omniglot-5w1s": dict(image=28, channels=1, strided=True, shots=1, steps=12),
    "omniglot-5w5s": dict(image=28, channels=1, strided=True, shots=5, steps=8),
    "miniimagenet-5w1s": dict(image=84, channels=3, strided=False, shots=1, steps=12),
    "miniimagenet-5w5s": dict(image=84, channels=3, strided=False, shots=5, steps=8),
}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(1000 * (time.perf_counter() - w))
        cpu.append(1000 * (time.process_time() - c))
    return {"wall_ms": statistics.median(wall), "wall_range": [min(wall), max(wall)], "cpu_ms": statistics.median(cpu)}


def measure(name: str, repeats: int) -> dict:
    from fewshot.algorithms.meta_lstm import MetaLSTM
    from fewshot.models import Conv4
    from fewshot.tasks.base import TaskBatch

    s = SETTINGS[name]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    learner = Conv4(5, in_channels=s["channels"], hidden=32, image_size=s["image"], strided=s["strided"])
    model = MetaLSTM(learner, F.cross_entropy, steps=s["steps"], batch_size=5 * s["shots"], grad_clip=0.25)
    shape = (s["channels"], s["image"], s["image"])
    tasks = TaskBatch(torch.rand(1, 5 * s["shots"], *shape), torch.arange(5).repeat_interleave(s["shots"])[None],
                      torch.rand(1, 75, *shape), torch.arange(5).repeat_interleave(15)[None])  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rss_before = _rss_kib()

    def train_step():
        optimizer.zero_grad()
        model.training_loss(tasks).backward()
        optimizer.step()

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.query_loss(tasks.task(0))
    theta = model.initial_params.detach()
    state = model.meta_learner.init(theta)
    grad, loss = torch.randn_like(theta), torch.tensor(1.0)
    with torch.no_grad():
        update = _timed(lambda: model.meta_learner.update(state, theta, grad, loss), repeats)
    result = {
        "setting": name,
        "coordinates": theta.numel(),
        "meta_learner_weights": sum(p.numel() for p in model.meta_learner.parameters()),
        "steps": s["steps"],
        "train": _timed(train_step, repeats),
        "test": _timed(lambda: model.episode(tasks.task(0), s["steps"]), repeats),
        "update_forward": update,
        "graph_saved_mib": saved[0] / 2**20,
        "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
        "torch": torch.__version__,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=list(SETTINGS), help="measure one setting in this process")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.repeats)))
        return
    results = []
    for name in SETTINGS:  # a fresh process each, so peak memory is this setting's
        out = subprocess.run([sys.executable, __file__, "--only", name, "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        results.append(json.loads(out.strip().splitlines()[-1]))
    print("| setting | P | T | meta-train episode, ms (CPU ms) | meta-test episode, ms (CPU ms) | update of all P, ms | graph saved for backward | peak RSS growth |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        t, e, u = r["train"], r["test"], r["update_forward"]
        print(f"| {r['setting']} | {r['coordinates']:,} | {r['steps']} | {t['wall_ms']:.0f} [{t['wall_range'][0]:.0f}-{t['wall_range'][1]:.0f}] ({t['cpu_ms']:.0f}) "
              f"| {e['wall_ms']:.0f} ({e['cpu_ms']:.0f}) | {u['wall_ms']:.1f} ({u['cpu_ms']:.1f}) | {r['graph_saved_mib']:.0f} MiB | {r['peak_rss_growth_mib']:.0f} MiB |")  # fmt: skip
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
