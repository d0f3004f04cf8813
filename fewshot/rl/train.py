"""The meta-RL training loop: sample a meta-batch of tasks, take a TRPO meta-step, log, checkpoint.

Same run-directory conventions as ``fewshot.train``: ``config.toml``,
``checkpoint.pt`` (written atomically every ``checkpoint_every`` iterations),
``metrics.csv`` (one row per meta-iteration). Every random draw of iteration i
(its tasks, the environments' seeds, the action noise) comes from a seed derived
from (config.seed, i), so the checkpoint holds only the policy and the iteration,
and ``--resume`` gives bit for bit the policy of an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from fewshot.checkpoint import load_checkpoint, save_checkpoint
from fewshot.rl import envs, maml_rl, rollouts
from fewshot.rl.config import RLConfig
from fewshot.rl.policy import GaussianPolicy
from fewshot.train import prepare_run_dir  # noqa: F401  (shared with supervised runs; re-exported)
from fewshot.train import CHECKPOINT_FILE, METRICS_FILE, TrainingDiverged, _CtrlC, _MetricsLog, _progress, interrupted, read_run

COLUMNS = ("iteration", "return_before", "return_after", "surrogate_after", "kl", "backtracks", "seconds", "env_steps_per_second")


CHECKPOINT_KEYS = ("iteration", "policy")  # what a meta-RL checkpoint must hold


def build_policy(config: RLConfig) -> GaussianPolicy:
    """The policy for ``config``, initialised from ``config.seed``."""
    torch.manual_seed(config.seed)
    obs_dim, act_dim = envs.dimensions(config.env, goal_in_observation=config.method == "oracle")
    return GaussianPolicy(obs_dim, act_dim, config.hidden)


def load_run(run_dir: Path) -> tuple[RLConfig, GaussianPolicy, dict]:
    config, state = read_run(run_dir, cls=RLConfig, required=CHECKPOINT_KEYS)
    policy = build_policy(config)
    policy.load_state_dict(state["policy"])
    return config, policy, state


def train(run_dir: Path, config: RLConfig, resume: bool = False, progress: bool = True) -> GaussianPolicy:
    """Meta-train ``config`` in the prepared ``run_dir``; returns the policy."""
    run_dir = Path(run_dir)
    policy = build_policy(config)
    start = 0
    if resume:
        state = load_checkpoint(run_dir / CHECKPOINT_FILE, required=CHECKPOINT_KEYS)
        policy.load_state_dict(state["policy"])
        start = state["iteration"]
    metrics = _MetricsLog(run_dir / METRICS_FILE, COLUMNS, keep_until=start)

    def checkpoint(iteration: int) -> None:
        save_checkpoint(run_dir / CHECKPOINT_FILE, {"iteration": iteration, "policy": policy.state_dict()})

    bar = _progress(progress, start, config.iterations)
    last_checkpoint = start
    with _CtrlC() as ctrl_c:
        for iteration in range(start + 1, config.iterations + 1):
            t0, steps0, seconds0 = time.perf_counter(), rollouts.STATS.steps, rollouts.STATS.seconds
            tasks = envs.sample_tasks(config.env, config.meta_batch, rollouts.seed_for(config.seed, iteration, 0))
            noise = torch.Generator().manual_seed(rollouts.seed_for(config.seed, iteration, 1))
            batch = maml_rl.sample_meta_batch(policy, dict(policy.named_parameters()), tasks, config, rollouts.seed_for(config.seed, iteration, 2), noise)
            info = maml_rl.trpo_meta_step(policy, batch, config)
            if not all(math.isfinite(v) for v in (info.loss_before, info.loss_after, batch.returns_after)) or not _finite(policy):
                bar.close()
                raise TrainingDiverged(
                    f"training diverged at iteration {iteration}: surrogate {info.loss_after}; the last good checkpoint "
                    f"({run_dir / CHECKPOINT_FILE}, iteration {last_checkpoint}) is kept. Lower max_kl or inner_lr."
                )
            env_rate = (rollouts.STATS.steps - steps0) / max(rollouts.STATS.seconds - seconds0, 1e-9)
            metrics.append(iteration, batch.returns_before, batch.returns_after, info.loss_after, info.kl, info.backtracks,
                           time.perf_counter() - t0, env_rate)  # fmt: skip
            bar.update(1)
            bar.set_postfix({"return before->after adaptation": f"{batch.returns_before:.1f}->{batch.returns_after:.1f}"})
            if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
                checkpoint(iteration)
                last_checkpoint = iteration
            if ctrl_c.pressed:
                checkpoint(iteration)
                bar.close()
                raise interrupted(run_dir, iteration)
    bar.close()
    return policy


def _finite(policy: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in policy.parameters())
