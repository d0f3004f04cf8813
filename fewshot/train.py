"""The meta-training loop: sample a meta-batch, step the outer optimizer, validate, checkpoint.

A run directory holds ``config.toml`` (the resolved config), ``checkpoint.pt``
(weights, optimizer state and every random state, written atomically),
``metrics.csv`` (one row per validation). ``resume`` continues from the
checkpoint to the same final parameters, bit for bit, as an uninterrupted run.
Ctrl-C finishes the current iteration, writes a checkpoint and stops; a NaN or
infinite loss or gradient stops the run before the bad step is applied, keeping
the last good checkpoint.

Scale-out: under ``torchrun --nproc_per_node=P`` (``torch.distributed``, gloo on
the CPU) every process draws the same meta-batch from the same task stream,
computes the meta-gradient of its share of the tasks, and the shares are summed
by all-reduce, so every process applies the same step; rank 0 writes the files.
A checkpoint holds no trace of P: it resumes with any number of processes.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fewshot import experiment
from fewshot.checkpoint import atomic_write_text, load_checkpoint, remove_stale_temporaries, save_checkpoint
from fewshot.config import Config, ConfigError, load, to_toml
from fewshot.device import resolve_device
from fewshot.tasks.base import TaskBatch

CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE = "config.toml", "checkpoint.pt", "metrics.csv"
CHECKPOINT_KEYS = ("iteration", "method", "optimizer", "task_stream", "torch_rng", "interval_losses")
# Methods whose training loss normalises the whole meta-batch as one batch-norm batch: a share of it per
# process would normalise differently, so they train in one process.
POOLED_BATCH_METHODS = ("finetune", "nearest")


def metrics_columns(config: Config) -> tuple[str, ...]:
    return ("iteration", "train_loss", f"val_{experiment.metric_name(config)}", "seconds", "iterations_per_second")


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint was written; ``--resume`` continues."""


class TrainingDiverged(Exception):
    """A non-finite loss or gradient; the message names the iteration and the kept checkpoint."""


def training_exit_status(command: str, run) -> int | None:
    """Call ``run()``; the CLI's exit status if training stopped early, else None.

    130 for Ctrl-C (a checkpoint was written), 1 for a diverged run; the
    message goes to stderr prefixed by ``command`` (e.g. ``"fewshot train"``).
    """
    try:
        run()
    except TrainingInterrupted as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 1
    return None


def read_run(run_dir: Path, cls=Config, required: tuple[str, ...] = ("iteration", "method")) -> tuple:
    """(config, checkpoint) of a run directory; a missing file, or a checkpoint without the ``required``
    keys, is a ConfigError naming it."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (run_dir / name).is_file():
            raise ConfigError(f"run directory {run_dir}: no {name} (train a run there first)")
    return load(run_dir / CONFIG_FILE, cls=cls), load_checkpoint(run_dir / CHECKPOINT_FILE, required=required)


def interrupted(run_dir: Path, iteration: int) -> TrainingInterrupted:
    """What Ctrl-C raises once the checkpoint of ``iteration`` is written."""
    return TrainingInterrupted(
        f"interrupted at iteration {iteration}; checkpoint written to {Path(run_dir) / CHECKPOINT_FILE}. Continue with --resume."
    )


def load_run(run_dir: Path, device: str | None = None) -> tuple[Config, nn.Module, dict]:
    """The config, the method with the checkpoint's weights (on ``device``), and the checkpoint itself."""
    config, state = read_run(run_dir)
    method = experiment.build_method(config)
    method.load_state_dict(state["method"])
    return config, method.to(resolve_device(device)), state


def prepare_run_dir(
    run_dir: Path, config: Config, resume: bool, overrides: dict, extendable: tuple[str, ...] = ("iterations",), check=None,
    checkpoint_keys: tuple[str, ...] = (),
) -> tuple[Config, bool]:
    """Write the config of a new run, or read and extend the config of a run to resume.

    Returns the config to train and whether a checkpoint is resumed: ``resume``
    without a checkpoint starts a new run, so a resumable command can be rerun.
    On resume, ``overrides`` (key -> value) other than the ``extendable`` keys
    must equal the stored config's, and ``iterations`` cannot go below the
    checkpoint's, whose ``checkpoint_keys`` are checked then. ``check(config)``, if
    given, runs on the resolved config before anything is written (so bad input
    leaves no half-made run directory).
    """
    run_dir = Path(run_dir)
    resume = resume and (run_dir / CHECKPOINT_FILE).is_file()
    if resume:
        stored = load(run_dir / CONFIG_FILE, cls=type(config))  # Config, RLConfig or ForecastConfig
        changed = sorted(k for k, v in overrides.items() if getattr(stored, k) != v and k not in extendable)
        if changed:
            allowed = f"only {', '.join('--' + k for k in extendable)}" if extendable else "its config is fixed"
            raise ConfigError(f"--resume: cannot change {', '.join(changed)} of an existing run ({allowed})")
        config = type(config)(**{**stored.__dict__, **{k: overrides[k] for k in extendable if k in overrides}})
        if "iterations" in extendable:  # supervised and meta-RL checkpoints count iterations; forecast ones do not extend
            state = load_checkpoint(run_dir / CHECKPOINT_FILE, required=checkpoint_keys)
            done = state.get("iteration") if isinstance(state, dict) else None
            if isinstance(done, int) and config.iterations < done:
                raise ConfigError(f"--iterations {config.iterations}: the run in {run_dir} is at iteration {done} already; allowed: {done} or more")
    elif (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(f"--out {run_dir}: holds a run already; pass --resume or choose another --out")
    if check is not None:
        check(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_and_world()[0] == 0:
        atomic_write_text(run_dir / CONFIG_FILE, to_toml(config))
    return config, resume


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        gpu = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo")  # the backend follows each tensor's device
    return dist.get_rank(), dist.get_world_size()


def check_trainable(config: Config) -> None:
    """What would stop ``train`` before its first iteration, checked before anything is written: the number
    of processes, the dataset's files (DataError), whether its episodes fit and MAML's settings combine (ConfigError)."""
    _, world = rank_and_world()
    if world > config.meta_batch:
        raise ConfigError(f"{world} processes for meta_batch={config.meta_batch}: allowed: at most meta_batch processes")
    if world > 1 and config.method in POOLED_BATCH_METHODS:
        raise ConfigError(f"method={config.method!r} under {world} processes: its pre-training normalises a whole meta-batch "
                          "as one batch-norm batch, which a share per process would change; allowed: one process")  # fmt: skip
    experiment.check_episodes(config)
    if config.method == "maml":
        try:  # MAML's own checks of how its settings combine (compile needs the batched path, ...)
            experiment.build_method(config)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(f"method='maml' with these settings: {error}") from None


def _share_of_meta_batch(method: nn.Module, batch: TaskBatch, rank: int, world: int) -> torch.Tensor:
    """This process's tasks' loss, weighted so that the shares of all processes sum to the meta-batch mean.
    A method that clips its meta-gradient (Meta-LSTM) hands over its share unclipped: the sum is clipped."""
    if world == 1:
        return method.training_loss(batch)
    n_tasks = batch.support_x.shape[0]
    mine = torch.tensor_split(torch.arange(n_tasks), world)[rank]
    share = TaskBatch(*(None if t is None else t[mine] for t in batch))
    unclipped = {"clip": False} if hasattr(method, "clip_gradients_") else {}
    return method.training_loss(share, **unclipped) * (len(mine) / n_tasks)


def _sum_over_processes(method: nn.Module, loss: torch.Tensor, stop: bool, world: int) -> tuple[torch.Tensor, bool]:
    """All-reduce (sum) the gradients, the loss shares and the Ctrl-C flags; every process then holds the
    full meta-gradient (None where no process had one, as in one process), and all stop after the same
    iteration if any one of them saw Ctrl-C."""
    if world == 1:
        return loss, stop
    params = list(method.parameters())
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flags = [float(stop)] + [float(p.grad is not None) for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [loss.detach().reshape(1), loss.new_tensor(flags)])  # on the loss's device (NCCL)
    dist.all_reduce(flat)
    n = sum(g.numel() for g in grads)
    stopped, has_grad = flat[n + 1] > 0, flat[n + 2 :] > 0
    for p, g, has in zip(params, torch.split(flat[:n], [g.numel() for g in grads]), has_grad.tolist()):
        p.grad = g.view_as(p).clone() if has else None
    if hasattr(method, "clip_gradients_"):
        method.clip_gradients_()
    return flat[n], bool(stopped)


def train(run_dir: Path, config: Config, resume: bool = False, progress: bool = True, device: str | None = None) -> nn.Module:
    """Meta-train ``config`` in ``run_dir`` (already prepared) on ``device``; returns the trained method."""
    run_dir = Path(run_dir)
    rank, world = rank_and_world()
    check_trainable(config)
    device = resolve_device(device)
    method = experiment.build_method(config).to(device)  # seeds the initial weights from config.seed
    optimizer = _adam(method.parameters(), config.outer_lr)
    task_stream = torch.Generator().manual_seed(config.seed)
    start, interval_losses = 0, []
    if resume:
        state = load_checkpoint(run_dir / CHECKPOINT_FILE, required=CHECKPOINT_KEYS)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        task_stream.set_state(state["task_stream"])
        torch.set_rng_state(state["torch_rng"])
        start = state["iteration"]
        interval_losses = state["interval_losses"]
    metrics = _MetricsLog(run_dir / METRICS_FILE, metrics_columns(config), keep_until=start)
    val_tasks = [b.to(device) for b in experiment.validation_tasks(config)] if rank == 0 else []
    if rank == 0:
        remove_stale_temporaries(run_dir / CHECKPOINT_FILE)  # left by a process killed while writing one

    def checkpoint(iteration: int) -> None:
        if rank != 0:
            return
        save_checkpoint(
            run_dir / CHECKPOINT_FILE,
            {
                "iteration": iteration,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "task_stream": task_stream.get_state(),
                "torch_rng": torch.get_rng_state(),
                "interval_losses": losses,  # training losses since the last metrics row
            },
        )

    bar = _progress(progress and rank == 0, start, config.iterations)
    losses, t0, last_checkpoint = interval_losses, time.perf_counter(), start
    timed = 0  # iterations run since t0 (after a resume, fewer than len(losses): those before it were not timed)
    with _CtrlC() as ctrl_c:
        for iteration in range(start + 1, config.iterations + 1):
            batch = experiment.training_batch(config, task_stream).to(device)  # the same on every process
            optimizer.zero_grad(set_to_none=True)
            loss = _share_of_meta_batch(method, batch, rank, world)
            loss.backward()  # a non-finite loss gives non-finite gradients: caught below, before the step
            loss, stop = _sum_over_processes(method, loss, ctrl_c.pressed, world)
            if not (torch.isfinite(loss) and _gradients_finite(method)):
                bar.close()
                what = f"non-finite gradient (loss {loss.item():.4g})" if torch.isfinite(loss) else f"loss {loss.item()}"
                kept = (
                    f"the last good checkpoint ({run_dir / CHECKPOINT_FILE}, iteration {last_checkpoint}) is kept"
                    if (run_dir / CHECKPOINT_FILE).is_file()
                    else "no checkpoint had been written yet"
                )
                raise TrainingDiverged(f"training diverged at iteration {iteration}: {what}; {kept}. Lower inner_lr or outer_lr.")
            if config.grad_clip_value > 0:
                nn.utils.clip_grad_value_(method.parameters(), config.grad_clip_value)
            optimizer.step()
            losses.append(loss.item())
            timed += 1
            bar.update(1)
            if iteration % config.val_every == 0 or iteration == config.iterations:
                if rank == 0:  # validation, metrics and checkpoint: one process writes for all
                    val = experiment.validation_metric(method, config, val_tasks)
                    seconds = time.perf_counter() - t0
                    metrics.append(iteration, sum(losses) / len(losses), val, seconds, timed / seconds)
                    bar.set_postfix({"loss": f"{losses[-1]:.3f}", f"val_{experiment.metric_name(config)}": f"{val:.3f}"})
                losses, t0, timed = [], time.perf_counter(), 0
                checkpoint(iteration)
                last_checkpoint = iteration
            if stop and iteration < config.iterations:  # at the last iteration the run is done anyway
                checkpoint(iteration)
                if world > 1:
                    dist.barrier()  # the others exit once rank 0's checkpoint is written
                bar.close()
                raise interrupted(run_dir, iteration)
    if world > 1:
        dist.barrier()  # every process leaves once rank 0 has validated and written the last checkpoint
    bar.close()
    return method


def _adam(parameters, lr: float) -> torch.optim.Adam:
    """Adam; the fused kernel where this torch has it on the CPU (3x faster on small models, measured)."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # torch < 2.4: no fused Adam on the CPU
        return torch.optim.Adam(parameters, lr=lr)


def _gradients_finite(method: nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in method.parameters() if p.grad is not None)


class _CtrlC:
    """SIGINT sets a flag instead of raising mid-iteration (so no half-applied optimizer step)."""

    pressed = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum, frame):  # every Ctrl-C alike: under torchrun a worker gets the terminal's and the agent's
        self.pressed = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _MetricsLog:
    """metrics.csv, rewritten atomically; rows past the checkpoint being resumed are dropped."""

    def __init__(self, path: Path, columns: tuple[str, ...], keep_until: int):
        self.path, self.columns = path, columns
        self.rows: list[list] = []
        if keep_until and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= keep_until]

    def append(self, *row) -> None:
        self.rows.append([row[0], *(f"{v:.6g}" for v in row[1:])])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([self.columns, *self.rows])
        atomic_write_text(self.path, text.getvalue())


def _progress(enabled: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="it", dynamic_ncols=True, desc="meta-train")
