"""fewshot's looped MAML against a plain per-task autograd loop (the learn2learn way), one intra-op thread.

    /tmp/peers-venv/bin/python benchmarks/loop_vs_plain.py      # or .venv/bin/python

Omniglot 20-way 1-shot, second order, 5 inner steps at lr 0.1, 4 tasks of the peer
harness's synthetic batch (../shared/peers/common.py, imported, not copied); prints ms
per call, interleaved, and the 12 most expensive kernels of each.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.profiler import profile

sys.path.insert(0, str(Path(os.environ.get("PEERS_DIR", Path(__file__).resolve().parents[2] / "shared" / "peers"))))
import common  # noqa: E402

from fewshot import MAML, TaskBatch  # noqa: E402

TASKS = 4


def main():
    torch.set_num_threads(1)
    wl = common.WORKLOADS["omniglot-20w1s"]
    model = common.build_model(wl)
    batch = TaskBatch(*[t[:TASKS] for t in common.make_batch(wl)])
    maml = MAML(model, F.cross_entropy, inner_lr=wl.inner_lr, inner_steps=wl.inner_steps, task_threads=1)
    params = dict(model.named_parameters())

    def plain():
        total = [torch.zeros_like(p) for p in params.values()]
        for i in range(TASKS):
            task, fast = batch.task(i), dict(params)
            for _ in range(wl.inner_steps):
                loss = F.cross_entropy(functional_call(model, fast, (task.support_x,)), task.support_y)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {n: p - wl.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
            query_loss = F.cross_entropy(functional_call(model, fast, (task.query_x,)), task.query_y) / TASKS
            for acc, g in zip(total, torch.autograd.grad(query_loss, list(params.values()))):
                acc.add_(g)

    def fewshot_loop():
        maml.meta_loss(batch).backward()

    for name, f in [("plain", plain), ("fewshot", fewshot_loop)] * 2:
        t0 = time.perf_counter()
        f()
        print(f"{name}: {(time.perf_counter() - t0) * 1000:.0f} ms")
    for name, f in [("plain", plain), ("fewshot", fewshot_loop)]:
        with profile() as prof:
            f()
        print(name)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
