"""Milliseconds for one task of the peer harness's Omniglot workloads on one thread, by part.

    python benchmarks/task_time.py omniglot-20w1s [--min-elements N] [--aten-conv-derivatives] [--repeats 4]

``MAML.meta_loss(...).backward()`` of the first task of the harness's batch (its model,
its synthetic images): second order, first order, and the support pass alone (the query
set replaced by one support image). One intra-op thread, ``keep_freed_cpu_memory()``
as ``fewshot train`` runs, a warm-up call, then the mean of ``--repeats`` calls.
``--min-elements`` sets ``fewshot.kernels.MIN_ELEMENTS`` (where the convolution route
and the fused block start; a large value turns both off). ``--aten-conv-derivatives``
has the routed convolutions differentiated by ATen (``F.conv2d``) instead of
``kernels._Conv2d``. Needs ``../shared/peers``.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fewshot.device
from fewshot import MAML, TaskBatch, kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "peers"))
import common  # noqa: E402  (the peer harness: workloads, model, batch)


def mean_ms(call, repeats: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=[w for w in common.WORKLOADS if w.startswith("omniglot")])
    parser.add_argument("--min-elements", type=int, default=kernels.MIN_ELEMENTS)
    parser.add_argument("--aten-conv-derivatives", action="store_true")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    fewshot.device.keep_freed_cpu_memory()
    torch.set_num_threads(1)
    kernels.MIN_ELEMENTS = args.min_elements
    if args.aten_conv_derivatives:
        kernels._Conv2d.apply = staticmethod(lambda x, w, b, *convolution: F.conv2d(x, w, b, *convolution))
    workload = common.WORKLOADS[args.workload]
    xs, ys, xq, yq = common.make_batch(workload)
    maml = MAML(common.build_model(workload), common.loss_fn(workload), inner_lr=workload.inner_lr,
                inner_steps=workload.inner_steps, task_threads=1)  # fmt: skip
    task = TaskBatch(xs[:1], ys[:1], xq[:1], yq[:1])
    support_only = TaskBatch(xs[:1], ys[:1], xs[:1, :1], ys[:1, :1])
    second = mean_ms(lambda: maml.meta_loss(task).backward(), args.repeats)
    first = mean_ms(lambda: maml.meta_loss(task, first_order=True).backward(), args.repeats)
    support = mean_ms(lambda: maml.meta_loss(support_only).backward(), args.repeats)
    conv = "ATen's" if args.aten_conv_derivatives else "kernels._Conv2d's"
    print(f"{args.workload} MIN_ELEMENTS={args.min_elements}, {conv} convolution derivatives: one task {second:.1f} ms second order, "
          f"{first:.1f} ms first order; support pass alone {support:.1f} ms second order")  # fmt: skip


if __name__ == "__main__":
    main()
