"""Meta-gradient agreement of fewshot with the peers, in the peer harness of ../shared/peers.

For each workload and order of the harness, fewshot's MAML (the step `bench_fewshot.py` times)
and learn2learn, higher and TorchOpt (the steps their `bench_*.py` time) each compute one
meta-gradient from the same initial weights on the same meta-batch; every one is compared with
the harness's plain torch.func per-task loop (the reference). The harness's own
`check_grads.meta_grad` runs each step; it is imported, not copied. Writes a Markdown table:

  /tmp/peers-venv/bin/python benchmarks/check_grads_fewshot.py [--dtype float32 float64] [--out FILE]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = Path(os.environ.get("PEERS_DIR", HERE.parents[1] / "shared" / "peers"))
sys.path[:0] = [str(PEERS), str(HERE)]

import torch  # noqa: E402

import bench_fewshot  # noqa: E402
import bench_func_loop  # noqa: E402
import bench_higher  # noqa: E402
import bench_l2l  # noqa: E402
import bench_torchopt  # noqa: E402
import check_grads  # noqa: E402
import common  # noqa: E402

ns = argparse.Namespace
FEWSHOT_ARGS = ns(keep_freed_memory=False, batched="auto", compile=False, task_threads="auto")
IMPLEMENTATIONS = [  # (name, make_step, args, orders)
    ("learn2learn", bench_l2l.make_step, ns(), ("second", "first")),
    ("higher", bench_higher.make_step, ns(), ("second", "first")),
    ("torchopt", bench_torchopt.make_step, ns(api="meta"), ("second",)),
    ("torchopt-functional", bench_torchopt.make_step, ns(api="functional"), ("second", "first")),
    ("fewshot", bench_fewshot.make_step, FEWSHOT_ARGS, ("second", "first")),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--workload", nargs="+", default=list(common.WORKLOADS), choices=list(common.WORKLOADS))
    parser.add_argument("--out", default=str(HERE / "results" / "check_grads_fewshot.md"))
    args = parser.parse_args()
    torch.set_num_threads(common.THREADS)
    rows = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for workload in args.workload:
            wl = common.WORKLOADS[workload]
            references = {}
            for order in wl.orders:
                t0 = time.perf_counter()
                reference, _ = check_grads.meta_grad(bench_func_loop.make_step, ns(), wl, order, dtype)
                exact = reference if dtype == torch.float64 else check_grads.meta_grad(bench_func_loop.make_step, ns(), wl, order, torch.float64)[0]
                references[order] = reference
                loop_vs_exact = check_grads.compare(reference.double(), exact)["rel"]
                for name, make_step, impl_args, orders in IMPLEMENTATIONS:
                    if order not in orders:
                        continue
                    grad, _ = check_grads.meta_grad(make_step, impl_args, wl, order, dtype)
                    diff = check_grads.compare(grad, reference)
                    to_exact = check_grads.compare(grad.double(), exact)["rel"]
                    rows.append({"dtype": dtype_name, "workload": workload, "order": order, "impl": name, **diff,
                                 "rel_to_float64": to_exact, "loop_rel_to_float64": loop_vs_exact})  # fmt: skip
                    print(f"{dtype_name} {workload} {order} {name}: max_abs {diff['max_abs']:.2e} rel {diff['rel']:.2e} "
                          f"(to the float64 loop: {to_exact:.2e}; the {dtype_name} loop's: {loop_vs_exact:.2e})", flush=True)  # fmt: skip
                print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            if len(references) == 2:  # for scale: what dropping the second derivatives changes
                diff = check_grads.compare(references["first"], references["second"])
                rows.append({"dtype": dtype_name, "workload": workload, "order": "first vs second", "impl": "torch.func loop (scale)", **diff})
    lines = [
        f"torch {torch.__version__}; threads {torch.get_num_threads()}; meta-gradient vs the harness's torch.func per-task loop",
        "",
        "relative = max abs difference / max abs of the reference; the last two columns: distance to the float64",
        "loop's meta-gradient (the exact one up to float64 rounding) of the implementation and of the loop in the row's dtype",
        "",
        "| dtype | workload | order | implementation | max abs difference to the loop | relative | relative to float64 | the loop's, relative to float64 |",
        "|---|---|---|---|---:|---:|---:|---:|",
        *(f"| {r['dtype']} | {r['workload']} | {r['order']} | {r['impl']} | {r['max_abs']:.1e} | {r['rel']:.1e} | "
          f"{r.get('rel_to_float64', float('nan')):.1e} | {r.get('loop_rel_to_float64', float('nan')):.1e} |" for r in rows),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
