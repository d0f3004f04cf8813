"""Milliseconds per training iteration of a preset under MAML's execution paths, interleaved.

    python benchmarks/preset_paths.py omniglot-5w5s-maml loop,batched 6

Modes: loop (per-task loop, task threads), batched (vmap over tasks), compiled (batched +
torch.compile). Each mode gets its own copy of the method, two warm-up iterations, then the
modes take turns on the same training batches (Adam step included); prints median and min.
Needs the preset's data (FEWSHOT_DATA / FEWSHOT_CACHE as for `fewshot train`).
"""

import dataclasses
import sys
import time

import torch

from fewshot.config import preset
from fewshot.experiment import build_method, training_batch

MODES = {"loop": {"batched": "no"}, "batched": {"batched": "yes"}, "compiled": {"batched": "yes", "compile": True}}


def training_step(method, optimizer, batch) -> None:
    optimizer.zero_grad()
    method.training_loss(batch).backward()
    optimizer.step()


def main(name: str, modes: list[str], iterations: int) -> None:
    base = preset(name)
    generator = torch.Generator().manual_seed(0)
    batches = [training_batch(base, generator) for _ in range(iterations + 2)]
    timings = {}
    for mode in modes:
        method = build_method(dataclasses.replace(base, **MODES[mode]))
        optimizer = torch.optim.Adam(method.parameters(), base.outer_lr)
        start = time.perf_counter()
        for batch in batches[:2]:
            training_step(method, optimizer, batch)
        print(f"{mode}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
        timings[mode] = (method, optimizer, [])
    for batch in batches[2:]:
        for method, optimizer, times in timings.values():
            start = time.perf_counter()
            training_step(method, optimizer, batch)
            times.append(time.perf_counter() - start)
    for mode, (_, _, times) in timings.items():
        times = sorted(times)
        print(f"{name} {mode}: median {1e3 * times[len(times) // 2]:.0f} ms, min {1e3 * times[0]:.0f} ms")


if __name__ == "__main__":
    if len(sys.argv) < 3 or any(m not in MODES for m in sys.argv[2].split(",")):
        sys.exit(f"usage: {sys.argv[0]} PRESET MODE[,MODE...] [ITERATIONS]; modes: {', '.join(MODES)}")
    main(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]) if len(sys.argv) > 3 else 6)
