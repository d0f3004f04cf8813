"""The sinusoid figures of Finn et al. 2017: Figure 2 (fits after adaptation) and Figure 3 (error vs steps)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fewshot import experiment
from fewshot.algorithms import TaskBatch
from fewshot.device import device_of
from fewshot.tasks.sinusoid import X_RANGE, Sinusoids, with_shots

FIGURE_STEPS = (0, 1, 10)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it as PNG to ``path``, close it; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def figure2(runs: dict[str, tuple], out: Path, task_index: int = 0, shots: tuple[int, ...] = (5, 10)) -> Path:
    """One panel per (run, K): the true curve, the K support points, predictions after 0, 1, 10 steps."""
    plt = pyplot()
    fig, axes = plt.subplots(len(shots), len(runs), figsize=(4.5 * len(runs), 3.2 * len(shots)), squeeze=False)
    grid = torch.linspace(*X_RANGE, 200).reshape(1, 200, 1)
    for col, (name, (config, method)) in enumerate(runs.items()):
        test = experiment.test_tasks(config)
        task = Sinusoids(test.info[task_index : task_index + 1, 0], test.info[task_index : task_index + 1, 1])
        for row, k in enumerate(shots):
            one = with_shots(test, k)
            dense = TaskBatch(one.support_x[task_index : task_index + 1], one.support_y[task_index : task_index + 1], grid, task(grid), test.info[task_index : task_index + 1])
            curve = [p.cpu() for p in method.adaptation_curve(dense.to(device_of(method)), max(FIGURE_STEPS))]
            ax = axes[row][col]
            ax.plot(grid[0, :, 0], dense.query_y[0, :, 0], color="tab:red", label="ground truth")
            for step, style in zip(FIGURE_STEPS, (":", "--", "-")):
                ax.plot(grid[0, :, 0], curve[step][0, :, 0], style, color="tab:green", label=f"after {step} step{'s' * (step != 1)}")
            ax.scatter(dense.support_x[0, :, 0], dense.support_y[0, :, 0], marker="^", color="tab:purple", zorder=3, label="support points")
            ax.set_title(f"{name}, K={k}")
            ax.set_ylim(-6, 6)
    axes[0][0].legend(fontsize=7, loc="lower left")
    return save_figure(fig, Path(out) / "figure2_fits.png")


def figure3(results: dict[str, dict], out: Path) -> Path:
    """The metric against the number of inner steps at meta-test, one panel per (metric, K) that any run
    has (MSE on a log scale, accuracy); in each, every run with that K: its mean with the 95% CI, its median."""
    plt = pyplot()
    panels = list(dict.fromkeys((result["metric"], k) for result in results.values() for k in result["by_shot"]))
    several_metrics = len({metric for metric, _ in panels}) > 1
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (metric, k) in zip(axes[0], panels):
        for name, result in results.items():
            if result["metric"] != metric or k not in result["by_shot"]:
                continue
            curve = result["by_shot"][k]
            steps = [p["step"] for p in curve]
            mean = torch.tensor([p["mean"] for p in curve])
            ci = torch.tensor([p["ci95"] for p in curve])
            line = ax.plot(steps, mean, marker="o", markersize=3, label=f"{name} (mean, 95% CI)")[0]
            ax.fill_between(steps, mean - ci, mean + ci, alpha=0.2, color=line.get_color())
            ax.plot(steps, [p["median"] for p in curve], "--", color=line.get_color(), label=f"{name} (median)")
        ax.set_title(f"K = {k}" + (f" ({'MSE' if metric == 'mse' else 'accuracy'})" if several_metrics else ""))
        ax.set_xlabel("gradient steps at meta-test")
        ax.set_ylabel("mean squared error" if metric == "mse" else "accuracy")
        if metric == "mse":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, Path(out) / "figure3_learning_curves.png")


def _validation_rows(run_dir: Path) -> tuple[str, list[list[float]]] | None:
    """(metric column name, rows) of a run's metrics.csv; None, with a warning naming it, where it has no rows."""
    import csv

    path = Path(run_dir) / "metrics.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        warnings.warn(f"{path}: not plotted ({e.strerror})", stacklevel=3)
        return None
    if len(rows) < 2:
        warnings.warn(f"{path}: not plotted (no validation yet)", stacklevel=3)
        return None
    return rows[0][2], [[float(v) for v in r] for r in rows[1:]]


def learning_curves(run_dirs: dict[str, Path], out: Path) -> Path:
    """Validation metric of each run against meta-iterations and against wall-clock (from metrics.csv);
    a row of panels per metric. Runs without a validation row yet are left out, with a warning."""
    from matplotlib import ticker

    plt = pyplot()
    by_metric: dict[str, dict[str, list]] = {}
    for name, run_dir in run_dirs.items():
        found = _validation_rows(run_dir)
        if found is not None:
            by_metric.setdefault(found[0], {})[name] = found[1]
    fig, axes = plt.subplots(max(1, len(by_metric)), 2, figsize=(9, 3.4 * max(1, len(by_metric))), squeeze=False)
    for row, (column, runs) in zip(axes, by_metric.items()):
        for name, rows in runs.items():
            values = [r[2] for r in rows]
            hours = torch.tensor([r[3] for r in rows]).cumsum(0) / 3600
            row[0].plot([r[0] for r in rows], values, marker="o", markersize=2, label=name)
            row[1].plot(hours, values, marker="o", markersize=2, label=name)
        for ax in row:
            ax.set_ylabel(column.replace("_", " "))
        row[0].legend(fontsize=8)
    for row in axes:
        for ax, xlabel in zip(row, ("meta-iterations", "wall-clock hours (training and validation)")):
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        row[0].xaxis.set_major_locator(ticker.MaxNLocator(6, integer=True))  # tens of thousands: labels must not run together
        row[0].xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
    return save_figure(fig, Path(out) / "learning_curves.png")


def metalstm_gates(runs: dict[str, tuple], out: Path, n_episodes: int = 100) -> Path:
    """Figure 3 of Ravi & Larochelle 2017: the Meta-LSTM's mean input and forget gate per learner layer
    across the update steps, over the first ``n_episodes`` fixed test episodes (line: mean; band: +-1 std)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.4 * len(runs)), squeeze=False)
    for row, (name, (config, method)) in enumerate(runs.items()):
        batches, seen = [], 0
        for batch in experiment.test_episode_batches(config):
            batches.append(TaskBatch(*(None if t is None else t[: n_episodes - seen] for t in batch)))
            seen += len(batches[-1].support_x)
            if seen >= n_episodes:
                break
        gates = [method.gate_means(batch) for batch in batches]
        modules = dict(method.learner.named_modules())
        labels = [f"{layer} ({type(modules[layer]).__name__})" for layer in gates[0]["layers"]]
        for col, key in enumerate(("input", "forget")):
            values = torch.cat([g[key] for g in gates])  # (episodes, steps, layers)
            mean, std = values.mean(0), values.std(0)
            steps = torch.arange(1, values.shape[1] + 1)
            ax = axes[row][col]
            for layer, label in enumerate(labels):
                line = ax.plot(steps, mean[:, layer], marker="o", markersize=2, label=label)[0]
                ax.fill_between(steps, mean[:, layer] - std[:, layer], mean[:, layer] + std[:, layer], alpha=0.15, color=line.get_color())
            ax.set_title(f"{name}: {key} gate ({len(values)} test episodes)")
            ax.set_xlabel("update step t")
            ax.set_ylabel(f"mean {key} gate {'i_t' if key == 'input' else 'f_t'}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=6, ncol=2)
    return save_figure(fig, Path(out) / "metalstm_gates.png")
