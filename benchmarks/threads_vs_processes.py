"""A preset's meta-batch on two task threads in one process against two single-thread processes.

    python benchmarks/threads_vs_processes.py omniglot-5w5s-maml [ITERATIONS] [ROUNDS]
    python benchmarks/threads_vs_processes.py harness:omniglot-5w1s 4 3   # the peer harness's workload

"threads": what ``fewshot train`` does on 2 cores, one process whose MAML runs two tasks side by
side on two threads (``task_threads="auto"``). "processes": what ``torchrun --nproc_per_node=2``
does, two processes started together, one intra-op thread each, each on its half of the
meta-batch (the all-reduce of the gradients, about 0.5 MB, is left out). Per round, each mode:
two warm-up iterations, then ms per iteration (forward, backward, Adam step) over ITERATIONS
training batches, the same batches for both; the processes' figure is the slower process's.
The rounds alternate the modes. Needs the preset's data (FEWSHOT_DATA / FEWSHOT_CACHE);
``harness:WORKLOAD`` times the peer harness's model and synthetic batch (../shared/peers,
second order, MAML's defaults otherwise) instead of a preset.
"""

import subprocess
import sys
import time
from pathlib import Path

import torch

import fewshot.device
from fewshot import TaskBatch
from fewshot.config import preset
from fewshot.experiment import build_method, training_batch


def method_and_batches(name: str, n_batches: int):
    """(MAML, outer lr, training batches) of a preset, or of the peer harness's ``harness:WORKLOAD``."""
    if name.startswith("harness:"):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "peers"))
        import common  # the peer harness: workloads, model, batch

        from fewshot import MAML

        workload = common.WORKLOADS[name.removeprefix("harness:")]
        maml = MAML(common.build_model(workload), common.loss_fn(workload), inner_lr=workload.inner_lr, inner_steps=workload.inner_steps)
        return maml, 1e-3, [TaskBatch(*common.make_batch(workload))] * n_batches
    config = preset(name)
    generator = torch.Generator().manual_seed(0)
    return build_method(config), config.outer_lr, [training_batch(config, generator) for _ in range(n_batches)]


def ms_per_iteration(name: str, iterations: int, part: int | None = None, parts: int = 1) -> float:
    """Train a fresh method on ``iterations`` batches (after two warm-up ones); ``part`` of ``parts``: that share of each batch."""
    method, outer_lr, batches = method_and_batches(name, iterations + 2)
    optimizer = torch.optim.Adam(method.parameters(), outer_lr)
    if part is not None:
        batches = [TaskBatch(*(t.tensor_split(parts)[part] for t in b[:4])) for b in batches]
    for i, batch in enumerate(batches):
        if i == 2:
            start = time.perf_counter()
        optimizer.zero_grad()
        method.training_loss(batch).backward()
        optimizer.step()
    return (time.perf_counter() - start) / iterations * 1e3


def processes(name: str, iterations: int) -> float:
    worker = [sys.executable, __file__, "--worker", name, str(iterations)]
    runs = [subprocess.Popen([*worker, str(rank)], stdout=subprocess.PIPE, text=True) for rank in range(2)]
    return max(float(run.communicate()[0]) for run in runs)


def main() -> None:
    fewshot.device.keep_freed_cpu_memory()  # as `fewshot train` does
    if sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        print(ms_per_iteration(sys.argv[2], int(sys.argv[3]), part=int(sys.argv[4]), parts=2))
        return
    name = sys.argv[1]
    iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    torch.set_num_threads(2)
    for r in range(rounds):
        modes = [("threads", lambda: ms_per_iteration(name, iterations)), ("processes", lambda: processes(name, iterations))]
        for mode, measure in modes if r % 2 == 0 else modes[::-1]:
            print(f"{name} round {r + 1} {mode}: {measure():.0f} ms per iteration", flush=True)


if __name__ == "__main__":
    main()
