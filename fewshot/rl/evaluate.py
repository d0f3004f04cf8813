"""Evaluation of meta-RL runs on fixed test tasks, and the paper's Figures 4 and 5.

For every run: the average return after 0, 1, ..., ``eval_steps`` policy-gradient
steps (fresh trajectories before each step, step size ``inner_lr``) on
``n_test_tasks`` fixed tasks, mean and 95% CI over tasks; beside it the same
curve for a randomly initialised policy (never trained) of the same family.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fewshot.checkpoint import atomic_write_text
from fewshot.metrics import mean_ci95
from fewshot.plots import pyplot, save_figure
from fewshot.rl import envs, maml_rl
from fewshot.rl.config import RLConfig
from fewshot.rl.train import build_policy, load_run

TEST_TASKS_SEED = 20_170_703  # fixed: the same test tasks (locomotion) and trajectory noise for every run of a task family
EVAL_JSON = "eval.json"
RANDOM = "random init"


def test_tasks(config: RLConfig) -> list[dict]:
    """2D navigation: the authors' 40 test goals (those of the paper's Table 4); locomotion: seeded tasks."""
    if config.env == "nav2d":
        return envs.nav_test_tasks(config.n_test_tasks)
    return envs.sample_tasks(config.env, config.n_test_tasks, TEST_TASKS_SEED)


def curve(policy: torch.nn.Module, config: RLConfig) -> list[dict]:
    """Mean return (and 95% CI over the test tasks) after each number of policy-gradient steps.

    The oracle is told the goal and is not adapted (a flat line, as in the paper's
    Figure 5): a policy-gradient step on its nearly deterministic policy only hurts.
    """
    steps = 0 if config.method == "oracle" else config.eval_steps
    returns = maml_rl.adaptation_returns(policy, test_tasks(config), config, steps, seed=TEST_TASKS_SEED)
    returns = returns.expand(config.eval_steps + 1, -1) if config.method == "oracle" else returns
    points = []
    for step, per_task in enumerate(returns):  # (n_tasks,)
        mean, ci95 = mean_ci95(per_task)
        points.append({"step": step, "mean": mean, "ci95": ci95, "n_tasks": per_task.numel()})
    return points


def random_config(config: RLConfig) -> RLConfig:
    """A never-trained policy of the same family: the random-initialisation baseline of the paper's Figure 5."""
    return dataclasses.replace(config, method="maml" if config.method == "oracle" else config.method)


def evaluate_runs(run_dirs: list[Path]) -> dict[str, dict]:
    """name -> result for every run (saved as eval.json in each) and one random-initialisation result."""
    results, config = {}, None
    for run_dir in run_dirs:
        config, policy, state = load_run(run_dir)
        result = {"env": config.env, "method": config.method, "iteration": state["iteration"], "curve": curve(policy, config)}
        atomic_write_text(Path(run_dir) / EVAL_JSON, json.dumps(result, indent=1) + "\n")
        name = run_dir.name if run_dir.name not in results else str(run_dir)
        results[f"{name} (not adapted)" if config.method == "oracle" else name] = result
    baseline = random_config(config)
    results[RANDOM] = {"env": baseline.env, "method": "random", "iteration": 0, "curve": curve(build_policy(baseline), baseline)}
    return results


def markdown_table(results: dict[str, dict]) -> str:
    steps = [p["step"] for p in next(iter(results.values()))["curve"]]
    lines = ["| run | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{p['mean']:.2f} ± {p['ci95']:.2f}" for p in result["curve"]) + " |")
    n = next(iter(results.values()))["curve"][0]["n_tasks"]
    return "\n".join(lines) + f"\n\nAverage return on {n} fixed test tasks after policy-gradient steps: mean ± 95% confidence interval.\n"


# --------------------------------------------------------------------------- figures


def figure5(results: dict[str, dict], out: Path) -> Path:
    """Average return against the number of policy-gradient steps (the paper's Figure 5)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, result in results.items():
        steps = [p["step"] for p in result["curve"]]
        mean, ci = torch.tensor([p["mean"] for p in result["curve"]]), torch.tensor([p["ci95"] for p in result["curve"]])
        line = ax.plot(steps, mean, marker="o", label=name)[0]
        ax.fill_between(steps, mean - ci, mean + ci, alpha=0.2, color=line.get_color())
    ax.set_xlabel("policy-gradient steps at test time")
    ax.set_ylabel("average return")
    ax.set_xticks(steps)
    ax.set_title(next(iter(results.values()))["env"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(out) / "figure5_returns.png")


def figure4(runs: dict[str, tuple], out: Path, task_index: int = 0, steps: tuple[int, ...] = (0, 1, 3)) -> Path:
    """2D navigation: one trajectory before and after 1 and 3 steps, and the goal (the paper's Figure 4)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4), squeeze=False)
    for ax, (name, (config, policy)) in zip(axes[0], runs.items()):
        tasks = test_tasks(config)[task_index : task_index + 1]
        sampled = maml_rl.adaptation_episodes(policy, tasks, config, max(steps), seed=TEST_TASKS_SEED)
        for step, style in zip(steps, (":", "--", "-")):
            episodes = sampled[step]
            length = int(episodes.mask[0, :, 0].sum())
            path = torch.cat([torch.zeros(1, 2), episodes.obs[0, 1:length, 0, :2] if length > 1 else torch.zeros(0, 2)])
            last_step = torch.as_tensor(envs.to_env_action("nav2d", episodes.actions[0, length - 1, 0].numpy()))
            path = torch.cat([path, (episodes.obs[0, length - 1, 0, :2] + last_step).view(1, 2)])
            ax.plot(path[:, 0], path[:, 1], style, marker=".", markersize=3, label=f"after {step} step{'s' * (step != 1)}")
        goal = tasks[0]["goal"]
        ax.scatter([goal[0]], [goal[1]], marker="*", s=200, color="tab:red", zorder=3, label="goal")
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    return save_figure(fig, Path(out) / "figure4_trajectories.png")


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    paths = [figure5(evaluate_runs(run_dirs), out)]
    nav = {}
    for run_dir in run_dirs:
        config, policy, _ = load_run(run_dir)
        if config.env == "nav2d" and config.method != "oracle":  # the oracle is not adapted
            nav[run_dir.name] = (config, policy)
    if nav:
        paths.append(figure4(nav, out))
    return paths
