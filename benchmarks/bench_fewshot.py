"""fewshot's MAML in the peer harness of ../shared/peers (same workloads, weights, data, timing).

Prints one JSON line like the peers' bench_*.py; run it beside them with
benchmarks/speed.sh. The harness (shared/peers/common.py) is a measuring
instrument that lives outside this repository; it is imported, not copied.
"""

import os
import sys
from pathlib import Path

PEERS = Path(os.environ.get("PEERS_DIR", Path(__file__).resolve().parents[2] / "shared" / "peers"))
sys.path.insert(0, str(PEERS))

import common  # noqa: E402  (the peer harness)

import fewshot  # noqa: E402
import fewshot.device  # noqa: E402
from fewshot import MAML, TaskBatch  # noqa: E402


def make_step(model, wl, order, args):
    if args.keep_freed_memory and not fewshot.device.keep_freed_cpu_memory():
        raise SystemExit("--keep-freed-memory: glibc's mallopt is not available here")
    batched = {"auto": "auto", "yes": True, "no": False}[args.batched]
    maml = MAML(model, common.loss_fn(wl), inner_lr=wl.inner_lr, inner_steps=wl.inner_steps,
                first_order=(order == "first"), batched=batched, compile=args.compile,
                task_threads=args.task_threads if args.task_threads == "auto" else int(args.task_threads))

    def step(batch):
        maml.meta_loss(TaskBatch(*batch)).backward()

    return step


def impl_name(args):
    threads = "" if args.task_threads == "auto" else f"-threads{args.task_threads}"
    kept = "+kept-memory" if args.keep_freed_memory else ""
    return f"fewshot-{args.batched}{threads}{kept}" + ("+compile" if args.compile else "")


if __name__ == "__main__":
    common.main(impl_name, make_step, versions={"fewshot": fewshot.__version__},
                extra_args=[(("--batched",), dict(choices=["auto", "yes", "no"], default="auto")),
                            (("--compile",), dict(action="store_true")),
                            (("--task-threads",), dict(default="auto")),
                            (("--keep-freed-memory",), dict(action="store_true",
                                                             help="call fewshot.device.keep_freed_cpu_memory() first, as the CLI does"))])
