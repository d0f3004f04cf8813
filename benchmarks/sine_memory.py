"""Resident memory over a long sinusoid MAML run (BENCHMARKS.md, "Memory").

    .venv/bin/python benchmarks/sine_memory.py --iterations 10000

Runs the real training step (experiment.training_batch, MAML.training_loss,
Adam) and prints RSS after 100, 1,000, ... iterations. Target: RSS after 10,000
iterations within 5% of RSS after 100 (learn2learn #88, #278, #284; TorchOpt #218
report growth).
"""

import argparse
import json
import os

import torch

from fewshot import experiment
from fewshot.config import preset


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--preset", default="sine-maml")
    args = parser.parse_args()
    config = preset(args.preset)
    method = experiment.build_method(config)
    optimizer = torch.optim.Adam(method.parameters(), lr=config.outer_lr)
    stream = torch.Generator().manual_seed(0)
    marks = {m for m in (100, 1000, 2000, 5000, 10_000, 20_000, 50_000) if m <= args.iterations} | {args.iterations}
    rss = {}
    for iteration in range(1, args.iterations + 1):
        loss = method.training_loss(experiment.training_batch(config, stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if iteration in marks:
            rss[iteration] = round(rss_mb(), 1)
    growth = rss[args.iterations] / rss[min(rss)] - 1
    print(json.dumps({"preset": args.preset, "rss_mb": rss, "growth_vs_first_mark": round(growth, 4), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
