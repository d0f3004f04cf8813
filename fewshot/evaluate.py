"""Meta-test evaluation: error after 0..S inner steps on the fixed test tasks, mean and 95% CI."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fewshot import experiment
from fewshot.checkpoint import atomic_write_text
from fewshot.config import Config
from fewshot.device import device_of
from fewshot.metrics import mean_ci95
from fewshot.tasks.sinusoid import with_shots

EVAL_JSON, EVAL_CSV = "eval.json", "eval.csv"
TABLE_STEPS = {"mse": (0, 1, 5, 10), "accuracy": (0, 1, 3, 5, 10)}  # the paper's step counts (and step 0)


def _summary(step: int, errors: torch.Tensor) -> dict:
    """One point of a curve: mean and 95% CI over tasks, and the median (robust to a few diverging tasks;
    ``torch.median``'s: of an even count, the lower of the two middle values, e.g. the 300th of 600)."""
    mean, ci95 = mean_ci95(errors)
    diverged_last = errors.nan_to_num(nan=float("inf"))  # a NaN error is a diverged task: the worst, not unordered
    return {"step": step, "mean": mean, "ci95": ci95, "median": diverged_last.median().item(), "n_tasks": errors.numel()}


def evaluate(method: nn.Module, config: Config) -> dict:
    """Error on the fixed meta-test tasks after 0..``eval_steps`` inner steps.

    Sinusoid: MSE for every K in ``eval_shots``; classification: accuracy on the
    fixed test episodes (K = ``k_shot``, ``eval_queries`` per class). Returns the
    JSON-ready result: the headline ``mean``/``ci95`` (the training K, after
    ``eval_steps`` steps), its per-step ``curve``, and every K's curve in ``by_shot``.
    """
    method.eval()
    chosen = experiment.prepare_for_evaluation(method, config)
    if config.dataset == "sinusoid":
        tasks = experiment.test_tasks(config)
        by_shot = {str(k): _curve(method, config, [with_shots(tasks, k)]) for k in config.eval_shots}
        k_head = config.k_shot if config.k_shot in config.eval_shots else config.eval_shots[0]
    else:
        by_shot = {str(config.k_shot): _curve(method, config, experiment.test_episode_batches(config))}
        k_head = config.k_shot
    head = by_shot[str(k_head)]
    return {
        "metric": experiment.metric_name(config),
        "mean": head[-1]["mean"],
        "ci95": head[-1]["ci95"],
        "n_tasks": head[-1]["n_tasks"],
        "k_shot": k_head,
        "steps": config.eval_steps,
        "curve": head,
        "by_shot": by_shot,
        "method": config.method,
        **({} if config.dataset == "sinusoid" else {"query_batch": config.query_group_size}),
        **chosen,
    }


def _curve(method: nn.Module, config: Config, batches) -> list[dict]:
    """Per step 0..eval_steps, the summary over every task of ``batches``."""
    per_step: list[list[torch.Tensor]] = [[] for _ in range(config.eval_steps + 1)]
    device = device_of(method)
    for batch in batches:
        for step, scores in enumerate(experiment.scores_after_steps(method, config, batch.to(device), config.eval_steps)):
            per_step[step].append(scores.cpu())
    return [_summary(step, torch.cat(scores)) for step, scores in enumerate(per_step)]


def save(result: dict, run_dir: Path, iteration: int) -> None:
    result = {**result, "checkpoint_iteration": iteration}
    atomic_write_text(Path(run_dir) / EVAL_JSON, json.dumps(result, indent=1) + "\n")
    metric = result["metric"]  # mse (sinusoid) or accuracy (classification)
    rows = [f"k_shot,step,{metric}_mean,{metric}_ci95,{metric}_median,n_tasks"]
    for k, curve in result["by_shot"].items():
        rows += [f"{k},{p['step']},{p['mean']:.6g},{p['ci95']:.6g},{p['median']:.6g},{result['n_tasks']}" for p in curve]
    atomic_write_text(Path(run_dir) / EVAL_CSV, "\n".join(rows) + "\n")


def markdown_table(results: dict[str, dict]) -> str:
    """A table per metric (MSE, accuracy), one row per (run, K); columns the metric after the steps of the
    paper's Table 2 up to the most any of its runs took, and after each run's own ``steps`` (blank past them)."""
    tables = []
    for metric in dict.fromkeys(result["metric"] for result in results.values()):
        runs = {name: result for name, result in results.items() if result["metric"] == metric}
        most = max(result["steps"] for result in runs.values())  # the paper's step counts, and each run's own
        steps = sorted({s for s in TABLE_STEPS[metric] if s <= most} | {result["steps"] for result in runs.values()})
        lines = [
            "| run | K | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps) + " |",
            "|---|---:|" + "---:|" * len(steps),
        ]
        for name, result in runs.items():
            for k, curve in result["by_shot"].items():
                cells = [_cell(curve[s]) if s <= result["steps"] else "" for s in steps]
                lines.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
        n_tasks = " / ".join(str(n) for n in dict.fromkeys(result["n_tasks"] for result in runs.values()))
        title = {"mse": "MSE", "accuracy": "Accuracy"}[metric]
        tables.append("\n".join(lines) + f"\n\n{title} on {n_tasks} fixed meta-test tasks: mean ± 95% confidence interval (median).\n")
    return "\n".join(tables)


def _cell(score: dict) -> str:
    return f"{score['mean']:.3f} ± {score['ci95']:.3f} ({score['median']:.3f})"
