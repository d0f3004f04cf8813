"""Meta-test evaluation: error after 0..S inner steps on the fixed test tasks, mean and 95% CI."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fewshot import experiment
from fewshot.checkpoint import atomic_write_text
from fewshot.config import Config
from fewshot.metrics import mean_ci95
from fewshot.tasks.sinusoid import with_shots

EVAL_JSON, EVAL_CSV = "eval.json", "eval.csv"
TABLE_STEPS = (0, 1, 5, 10)  # the columns of the paper's appendix Table 2 (and step 0)


def _summary(step: int, errors: torch.Tensor) -> dict:
    """One point of a curve: mean and 95% CI over tasks, and the median (robust to a few diverging tasks)."""
    mean, ci95 = mean_ci95(errors)
    diverged_last = errors.nan_to_num(nan=float("inf"))  # a NaN error is a diverged task: the worst, not unordered
    return {"step": step, "mean": mean, "ci95": ci95, "median": diverged_last.median().item()}


def evaluate(method: nn.Module, config: Config) -> dict:
    """MSE on the fixed meta-test tasks for every K in ``eval_shots`` after 0..``eval_steps`` steps.

    Returns the JSON-ready result: the headline ``mean``/``ci95`` (K = the
    training K when it is evaluated, after ``eval_steps`` steps), its per-step
    ``curve``, and every K's curve in ``by_shot``.
    """
    method.eval()
    tasks = experiment.test_tasks(config)
    chosen = experiment.prepare_for_evaluation(method, config)
    by_shot = {}
    for k in config.eval_shots:
        shot_tasks = with_shots(tasks, k)
        curve = method.adaptation_curve(shot_tasks, config.eval_steps)
        by_shot[str(k)] = [_summary(step, experiment.per_task_mse(pred, shot_tasks.query_y)) for step, pred in enumerate(curve)]
    k_head = config.k_shot if config.k_shot in config.eval_shots else config.eval_shots[0]
    head = by_shot[str(k_head)]
    return {
        "metric": "mse",
        "mean": head[-1]["mean"],
        "ci95": head[-1]["ci95"],
        "n_tasks": tasks.support_x.shape[0],
        "k_shot": k_head,
        "steps": config.eval_steps,
        "curve": head,
        "by_shot": by_shot,
        "method": config.method,
        **chosen,
    }


def save(result: dict, run_dir: Path, iteration: int) -> None:
    result = {**result, "checkpoint_iteration": iteration}
    atomic_write_text(Path(run_dir) / EVAL_JSON, json.dumps(result, indent=1) + "\n")
    rows = ["k_shot,step,mse_mean,mse_ci95,mse_median,n_tasks"]
    for k, curve in result["by_shot"].items():
        rows += [f"{k},{p['step']},{p['mean']:.6g},{p['ci95']:.6g},{p['median']:.6g},{result['n_tasks']}" for p in curve]
    atomic_write_text(Path(run_dir) / EVAL_CSV, "\n".join(rows) + "\n")


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (run, K); columns MSE after the steps of the paper's Table 2."""
    any_result = next(iter(results.values()))
    steps = [s for s in TABLE_STEPS if s <= any_result["steps"]]
    lines = [
        "| run | K | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps) + " |",
        "|---|---:|" + "---:|" * len(steps),
    ]
    for name, result in results.items():
        for k, curve in result["by_shot"].items():
            cells = [f"{curve[s]['mean']:.3f} ± {curve[s]['ci95']:.3f} ({curve[s]['median']:.3f})" for s in steps]
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    n = any_result["n_tasks"]
    return "\n".join(lines) + f"\n\nMSE on {n} fixed meta-test tasks: mean ± 95% confidence interval (median).\n"
