"""Trajectories for many tasks at once: a batch of environments, the policy evaluated batched over tasks.

The policy's actions live in [-1, 1] per coordinate and are scaled to the
environment's box (``envs.to_env_action``, as the MAML authors' code). ``Episodes`` holds tensors shaped (B tasks, T steps, K trajectories, ...) with a
``mask`` that is 1 up to and including the step an episode ended on. Action noise
comes from a ``torch.Generator`` and the environments' own randomness from
``seed``, so the same seeds give the same trajectories.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from fewshot.algorithms.maml import Params
from fewshot.rl import envs
from fewshot.rl.policy import distribution


class Episodes(NamedTuple):
    obs: Tensor  # (B, T, K, obs_dim)
    actions: Tensor  # (B, T, K, act_dim)
    rewards: Tensor  # (B, T, K)
    mask: Tensor  # (B, T, K), 1.0 while the episode runs

    def returns(self) -> Tensor:
        """Undiscounted return of every trajectory: (B, K)."""
        return (self.rewards * self.mask).sum(1)


class RolloutStats:
    """Environment steps and seconds spent in rollouts (for steps per second)."""

    def __init__(self):
        self.steps, self.seconds = 0, 0.0


STATS = RolloutStats()


@torch.no_grad()
def sample(
    policy: nn.Module,
    params: Params,
    env: str,
    tasks: list[dict],
    n_trajectories: int,
    seed: int,
    generator: torch.Generator,
    goal_in_observation: bool = False,
    reward: str = "distance",
) -> Episodes:
    """K trajectories per task, every task with its own parameters ``params`` (leading dim B)."""
    start = time.perf_counter()
    batch = envs.make_batch(env, tasks, n_trajectories, goal_in_observation, reward)
    n_tasks, k = len(tasks), n_trajectories
    act = vmap(lambda p, o: distribution(policy, p, o))
    obs = torch.as_tensor(batch.reset(seed)).view(n_tasks, k, -1)
    alive = torch.ones(n_tasks, k)
    observations, actions, rewards, masks = [], [], [], []
    for _ in range(batch.horizon):
        mean, log_std = act(params, obs)  # (B, K, act_dim)
        noise = torch.randn(mean.shape, generator=generator)
        action = mean + torch.exp(log_std) * noise
        next_obs, reward, done = batch.step(envs.to_env_action(env, action.reshape(n_tasks * k, -1).double().numpy()))
        observations.append(obs)
        actions.append(action)
        rewards.append(torch.as_tensor(reward, dtype=torch.float32).view(n_tasks, k) * alive)
        masks.append(alive)
        alive = alive * (1.0 - torch.as_tensor(done, dtype=torch.float32).view(n_tasks, k))
        obs = torch.as_tensor(next_obs).view(n_tasks, k, -1)
        if not alive.any():
            break
    episodes = Episodes(*(torch.stack(x, dim=1) for x in (observations, actions, rewards, masks)))
    STATS.steps += n_tasks * k * len(masks)  # every simulated step, finished agents included
    STATS.seconds += time.perf_counter() - start
    return episodes


def seed_for(*keys: int) -> int:
    """A 32-bit seed derived from integers (run seed, iteration, purpose)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
