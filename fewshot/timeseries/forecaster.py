"""The meta-learned forecaster: one MAML-trained MLP per frequency group, adapted per series.

Meta-training (Finn et al. 2017, Algorithm 2, with Meta-SGD step sizes, Li et al.
2017), for each group: draw B series and a random forecast origin t in each; the
support is the lag windows before t, the query the horizon after t
(``windows.sample_training_tasks``); minimise the query loss after
``inner_steps`` adaptation steps (``MAML.meta_loss``, batched over series with
``torch.func.vmap``).

Forecasting: every series of a batch is adapted on its own support windows in
one vmapped call (``adapt_batched``: ``fewshot.algorithms.maml.adapt`` on
per-series parameter copies), then forecasts its horizon from its last L
values. The interval is forecast ± z sigma_h, sigma_h the root mean square of the
adapted model's h-step errors on the series' own support windows (at least the
one-step error times sqrt(h)); in-sample, so it tends to be narrow
(BENCHMARKS.md measures its coverage).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fewshot.algorithms.maml import MAML, adapt, per_task_copies
from fewshot.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from fewshot.config import ConfigError
from fewshot.timeseries import config as tscfg
from fewshot.timeseries.data import Series, load_competition
from fewshot.timeseries.windows import (
    SeriesTasks,
    denormalise,
    detect_period,
    history_matrix,
    make_tasks,
    masked_mae,
    pad_series,
    sample_training_tasks,
)
from fewshot.train import TrainingDiverged, _CtrlC, interrupted

CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE = "config.toml", "checkpoint.pt", "metrics.csv"
Z_95 = 1.959964
SHORT = "naive (short)"


@dataclass(frozen=True)
class GroupSpec:
    name: str
    lags: int  # L
    horizon: int  # H
    windows: int  # K
    period: int


def mlp(lags: int, horizon: int, hidden: int) -> nn.Module:
    """The forecaster f_theta: L normalised lags -> H normalised future values (direct multi-step)."""
    return nn.Sequential(nn.Linear(lags, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, horizon))


def build_maml(spec: GroupSpec, config: tscfg.ForecastConfig) -> MAML:
    model = mlp(spec.lags, spec.horizon, config.hidden)
    learn = "per_tensor" if config.inner_steps > 0 else False
    return MAML(model, masked_mae, inner_lr=config.inner_lr, inner_steps=config.inner_steps, learn_inner_lr=learn, batched=True)


def group_specs(config: tscfg.ForecastConfig) -> list[GroupSpec]:
    return [
        GroupSpec(g, lags, h, k, tscfg.PERIOD_OF_GROUP[g])
        for g, lags, h, k in zip(config.groups, config.lags, config.horizons, config.windows)
    ]


# --------------------------------------------------------------------------- series selection


def select_series(source: str, group: str | None = None) -> list[Series]:
    """The series named by ``source`` (config docstring), in the frequency group ``group`` (None: all)."""
    competition, frequency, half = tscfg.parse_source(source)
    series = load_competition(competition, frequency)
    if half is not None:
        series = series[0::2] if half == "even" else series[1::2]
    return [s for s in series if group in (None, "all") or group_of(s.frequency) == group]


def group_of(frequency: str) -> str:
    """The group that serves a competition frequency; M3's 'other' (non-seasonal, horizon 8) goes to quarterly."""
    return {"other": "quarterly"}.get(frequency, frequency)


def choose_group(specs: Sequence[GroupSpec], values: np.ndarray, frequency: str | None = None) -> GroupSpec:
    """The model for one series: by its frequency if known, else by its detected seasonal period."""
    by_name = {s.name: s for s in specs}
    if frequency is not None:
        name = group_of(frequency)
        if name in by_name:
            return by_name[name]
        if "all" in by_name:
            return by_name["all"]
        raise ConfigError(f"frequency {frequency!r}: this run has models for {', '.join(by_name)} only")
    period = detect_period(values)
    for spec in specs:
        if spec.period == period and spec.name != "all":
            return spec
    return by_name.get("all") or next((s for s in specs if s.period == 1), specs[0])


# --------------------------------------------------------------------------- meta-training


def train_group(spec: GroupSpec, config: tscfg.ForecastConfig, series: list[np.ndarray], log=print, resume_from: dict | None = None,
                checkpoint=None, ctrl_c=None, run_dir: Path | None = None) -> tuple[MAML, list[dict]]:  # fmt: skip
    """Meta-train one group's model on ``series`` (90%; 10% held out for the validation rows).

    ``checkpoint(progress)`` is called with the group's training state (``progress``:
    weights, optimizer, task stream and torch random states, metrics rows) after
    every validation and when ``ctrl_c.pressed`` (``fewshot.train._CtrlC``), which
    then raises ``TrainingInterrupted`` naming ``run_dir``; ``resume_from`` is such
    a state to continue from.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(series), generator=generator).tolist()
    n_val = max(1, len(series) // 10)
    train = [series[i] for i in order[n_val:]]
    val = [series[i] for i in order[:n_val]]
    maml = build_maml(spec, config)
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.outer_lr)
    rows, start = [], 0
    if resume_from is not None:
        maml.load_state_dict(resume_from["state"])
        optimizer.load_state_dict(resume_from["optimizer"])
        generator.set_state(resume_from["task_stream"])
        torch.set_rng_state(resume_from["torch_rng"])
        rows, start = list(resume_from["rows"]), resume_from["iteration"]
    padded, lengths = pad_series(train, spec.lags, spec.windows, spec.horizon)
    val_tasks = validation_tasks(val, spec)

    def progress(iteration: int) -> dict:
        return {"group": spec.name, "iteration": iteration, "state": maml.state_dict(), "optimizer": optimizer.state_dict(),
                "task_stream": generator.get_state(), "torch_rng": torch.get_rng_state(), "rows": rows}  # fmt: skip

    clock, last_checkpoint = time.time(), start
    for iteration in range(start + 1, config.iterations + 1):
        tasks, target, _, _ = sample_training_tasks(padded, lengths, spec.lags, spec.horizon, spec.windows, config.meta_batch, generator)
        optimizer.zero_grad()
        loss = maml.meta_loss((tasks.support_x, tasks.support_y, tasks.query_x[:, None], target[:, None]))
        if not torch.isfinite(loss):
            kept = f"iteration {last_checkpoint} of this group" if last_checkpoint else "the groups finished before this one"
            raise TrainingDiverged(f"group {spec.name}: training diverged at iteration {iteration}: meta-loss {loss.item()}; "
                                   f"the last good checkpoint ({kept}) is kept. Lower inner_lr or outer_lr.")  # fmt: skip
        loss.backward()
        optimizer.step()
        if iteration % config.val_every == 0 or iteration == config.iterations:
            val_loss = validation_loss(maml, spec, val_tasks, config.adapt_steps)
            rows.append({"group": spec.name, "iteration": iteration, "train_loss": loss.item(), "val_loss": val_loss, "seconds": round(time.time() - clock, 1)})
            log(f"  {spec.name} {iteration}/{config.iterations}: train {loss.item():.4f} val {val_loss:.4f} ({time.time() - clock:.0f} s)")
            if checkpoint is not None and iteration < config.iterations:  # the finished group is saved by train_run
                checkpoint(progress(iteration))
                last_checkpoint = iteration
        if ctrl_c is not None and ctrl_c.pressed:
            if checkpoint is not None:
                checkpoint(progress(iteration))
            raise interrupted(run_dir, f"{iteration} of group {spec.name}")
    return maml, rows


def validation_tasks(series: list[np.ndarray], spec: GroupSpec):
    """Fixed tasks: each held-out series' last horizon is the query, its history before it the support."""
    usable = [v for v in series if len(v) >= spec.lags + 1 + spec.horizon]
    tasks = make_tasks(history_matrix([v[:-spec.horizon] for v in usable], spec.lags + spec.windows), spec.lags, spec.horizon)
    future = torch.tensor(np.stack([v[-spec.horizon:] for v in usable]), dtype=torch.float32)
    return tasks, future


def validation_loss(maml: MAML, spec: GroupSpec, val_tasks, steps: int) -> float:
    tasks, future = val_tasks
    prediction = predict_normalised(maml, tasks, steps)[0]
    target = (future - tasks.last[:, None]) / tasks.scale[:, None]
    return float((prediction - target).abs().mean())


# --------------------------------------------------------------------------- adaptation and forecasting


def adapt_batched(maml: MAML, support_x: Tensor, support_y: Tensor, steps: int) -> dict[str, Tensor]:
    """theta'_i for every series i at once: per-series parameter copies, one vmapped inner loop. (B, *shape) each."""
    theta = {n: p.detach() for n, p in maml.meta_parameters().items()}
    lrs = {n: lr.detach() if isinstance(lr, Tensor) else lr for n, lr in maml.step_sizes().items()}
    per_series = per_task_copies(theta, support_x.shape[0])
    if steps == 0:
        return per_series
    with torch.no_grad():
        return adapt(vmap(maml._task_loss), per_series, (support_x, support_y), lrs, steps, first_order=True)


def adapt_one(maml: MAML, support_x: Tensor, support_y: Tensor, steps: int) -> dict[str, Tensor]:
    """The same for one series (K, L), (K, 2H), by the unbatched inner loop: the reference for ``adapt_batched``."""
    theta = {n: p.detach() for n, p in maml.meta_parameters().items()}
    lrs = {n: lr.detach() if isinstance(lr, Tensor) else lr for n, lr in maml.step_sizes().items()}
    with torch.no_grad():
        return adapt(maml._task_loss, theta, (support_x, support_y), lrs, steps, first_order=True)


def batched_forward(maml: MAML, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """f_{theta'_i}(x_i) for every series: x (B, N, L) -> (B, N, H)."""
    return vmap(lambda p, xi: functional_call(maml.module, p, (xi,)))(params, x)


def predict_normalised(maml: MAML, tasks: SeriesTasks, steps: int) -> tuple[Tensor, Tensor]:
    """(forecast (B, H), sigma (B, H)) in the normalised scale, after ``steps`` adaptation steps."""
    return adapt_and_predict(maml, tasks, steps)[1:]


def adapt_and_predict(maml: MAML, tasks: SeriesTasks, steps: int) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """(adapted parameters, forecast (B, H), sigma (B, H)), normalised scale."""
    params = adapt_batched(maml, tasks.support_x, tasks.support_y, steps)
    with torch.no_grad():
        forecast = batched_forward(maml, params, tasks.query_x[:, None])[:, 0]  # (B, H)
        fitted = batched_forward(maml, params, tasks.support_x)  # (B, K, H)
    horizon = forecast.shape[-1]
    values, weights = tasks.support_y[..., :horizon], tasks.support_y[..., horizon:]
    squared = (weights * (fitted - values) ** 2).sum(1)  # (B, H)
    count = weights.sum(1)
    rms = (squared / count.clamp_min(1)).sqrt()
    one_step = rms[:, :1]
    floor = one_step * torch.arange(1, horizon + 1).sqrt()
    sigma = torch.where(count >= 3, torch.maximum(rms, floor), floor).cummax(1).values
    return params, forecast, sigma


@dataclass
class Forecasts:
    """Forecasts of a batch of series, in their own units."""

    mean: np.ndarray  # (B, H)
    lower: np.ndarray  # (B, H)
    upper: np.ndarray  # (B, H)
    method: list[str]  # "maml/<group>" or "naive (short)"


def forecast(maml: MAML, spec: GroupSpec, values: Sequence[np.ndarray], steps: int, horizon: int | None = None) -> Forecasts:
    """Adapt to every series and forecast ``horizon`` (<= the model's) values with a 95% interval.

    A series with at most L values (no complete support window) gets the naive
    forecast (its last value repeated) with no interval, marked ``naive (short)``.
    """
    horizon = spec.horizon if horizon is None else horizon
    if not 1 <= horizon <= spec.horizon:
        raise ConfigError(f"--horizon {horizon}: must be between 1 and the {spec.name} model's horizon {spec.horizon}")
    tasks = make_tasks(history_matrix(values, spec.lags + spec.windows), spec.lags, spec.horizon)
    normalised, sigma = predict_normalised(maml, tasks, steps)
    mean = denormalise(tasks, normalised)[:, :horizon].double().numpy()
    half = (Z_95 * sigma * tasks.scale[:, None])[:, :horizon].double().numpy()
    lower, upper = mean - half, mean + half
    short = np.array([len(v) <= spec.lags for v in values])
    if short.any():
        last = np.array([v[-1] if len(v) else np.nan for v in values])
        mean[short] = last[short, None]
        lower[short] = upper[short] = np.nan
    method = [SHORT if s else f"maml/{spec.name}" for s in short]
    return Forecasts(mean, lower, upper, method)


# --------------------------------------------------------------------------- runs on disk


def train_run(run_dir: Path, config: tscfg.ForecastConfig, log=print, resume: bool = False) -> dict[str, MAML]:
    """Meta-train every group of ``config`` into ``run_dir`` (config.toml, checkpoint.pt, metrics.csv).

    The groups are trained one after the other. ``checkpoint.pt`` (written
    atomically) holds every finished group's model and, after each validation
    (every ``val_every`` iterations) and on Ctrl-C, the state of the group in
    training (``train_group``). Ctrl-C writes it and raises ``TrainingInterrupted``;
    ``resume=True`` continues from it to the same parameters, bit for bit, as an
    uninterrupted run (``prepare_run_dir`` checks that the config is unchanged).
    A non-finite meta-loss raises ``TrainingDiverged`` before the bad step.
    """
    run_dir = Path(run_dir)
    if resume:
        state = load_checkpoint(run_dir / CHECKPOINT_FILE, required=("groups",))
        state.setdefault("rows", [])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, tscfg.to_toml(config))
        state = {"groups": {}, "rows": []}
    models = {}

    def save(in_training: dict | None) -> None:
        save_checkpoint(run_dir / CHECKPOINT_FILE, {**state, "in_training": in_training} if in_training else state)
        rows = state["rows"] + (in_training["rows"] if in_training else [])
        if rows:
            atomic_write_text(run_dir / METRICS_FILE, _csv(rows))

    with _CtrlC() as ctrl_c:
        for spec in group_specs(config):
            if spec.name in state["groups"]:  # finished before the interruption
                models[spec.name] = build_maml(spec, config)
                models[spec.name].load_state_dict(state["groups"][spec.name]["state"])
                continue
            series = [s.history for source in config.sources for s in select_series(source, spec.name)]
            if not series:
                raise ConfigError(f"group {spec.name}: the sources {', '.join(config.sources)} hold no such series")
            log(f"group {spec.name}: {len(series)} meta-train series, L={spec.lags}, H={spec.horizon}, K={spec.windows}")
            in_training = state.get("in_training")
            resume_from = in_training if in_training is not None and in_training["group"] == spec.name else None
            maml, rows = train_group(spec, config, series, log, resume_from, save, ctrl_c, run_dir)
            models[spec.name] = maml
            state["groups"][spec.name] = {"spec": asdict(spec), "state": maml.state_dict()}
            state["rows"] += rows
            state.pop("in_training", None)
            save(None)  # after every group
    return models


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def load_run(run_dir: Path) -> tuple[tscfg.ForecastConfig, dict[str, tuple[GroupSpec, MAML]]]:
    """The config and, per group, its spec and meta-trained model."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (run_dir / name).is_file():
            raise ConfigError(f"RUN_DIR {run_dir}: no {name} (train one with `fewshot forecast train PRESET --out {run_dir}`)")
    config = tscfg.load(run_dir / CONFIG_FILE)
    state = load_checkpoint(run_dir / CHECKPOINT_FILE, required=("groups",))
    if not state["groups"]:
        raise ConfigError(f"RUN_DIR {run_dir}: training was interrupted before its first group was finished "
                          f"(continue it with `fewshot forecast train PRESET --out {run_dir} --resume`)")  # fmt: skip
    models = {}
    for name, group in state["groups"].items():
        spec = GroupSpec(**group["spec"])
        maml = build_maml(spec, config)
        maml.load_state_dict(group["state"])
        models[name] = (spec, maml)
    return config, models
