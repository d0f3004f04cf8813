"""Return after 0..3 policy-gradient steps at several test-time step sizes (BENCHMARKS.md, "Meta-RL").

The runs are evaluated on the same 40 fixed test tasks as ``fewshot eval``; the
step size used at training (0.1) is the first column of the table of ``fewshot eval``.

    python benchmarks/rl_nav2d_step_sizes.py runs/nav2d-maml runs/nav2d-pretrained --step-sizes 0.05 0.1
"""

import argparse
from pathlib import Path

from fewshot.metrics import mean_ci95
from fewshot.rl import evaluate, maml_rl
from fewshot.rl.train import build_policy, load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--step-sizes", nargs="+", type=float, default=[0.05, 0.1])
    args = parser.parse_args()
    print("| run | step size | 0 steps | 1 step | 2 steps | 3 steps |\n|---|---:|---:|---:|---:|---:|")
    runs = [(run_dir.name, *load_run(run_dir)[:2]) for run_dir in args.run_dirs]
    config = runs[0][1]
    random = evaluate.random_config(config)
    runs.append((evaluate.RANDOM, random, build_policy(random)))
    for name, config, policy in runs:
        for lr in args.step_sizes:
            returns = maml_rl.adaptation_returns(policy, evaluate.test_tasks(config), config, 3, evaluate.TEST_TASKS_SEED, inner_lr=lr)
            cells = " | ".join("{:.2f} ± {:.2f}".format(*mean_ci95(r)) for r in returns)
            print(f"| {name} | {lr} | {cells} |")


if __name__ == "__main__":
    main()
