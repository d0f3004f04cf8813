"""Discounted returns, the linear feature baseline (Duan et al. 2016) and normalised advantages.

The baseline is the rllab one the MAML authors used: a ridge regression of the
discounted return on features (s, s^2, t, t^2, t^3, 1) with t = step / 100,
fitted per task on that task's own trajectories.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewshot.rl.rollouts import Episodes


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """R_t = sum_{l >= 0} gamma^l r_{t+l}, per trajectory: (B, T, K)."""
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running
        returns[:, t] = running
    return returns


def features(episodes: Episodes) -> Tensor:
    """(B, T, K, 2 * obs_dim + 4): clipped observation, its square, t, t^2, t^3 and 1."""
    obs = episodes.obs.clamp(-10, 10)
    b, t, k, _ = obs.shape
    time = (torch.arange(t, dtype=obs.dtype) / 100.0).view(1, t, 1, 1).expand(b, t, k, 1)
    return torch.cat([obs, obs**2, time, time**2, time**3, torch.ones_like(time)], dim=-1)


def linear_baseline(episodes: Episodes, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Per-task least squares fit of the returns on ``features``; its predictions (B, T, K).

    The ridge term grows tenfold until the solve is finite (as in rllab).
    """
    x = features(episodes) * episodes.mask.unsqueeze(-1)  # padded steps: zero features, zero target
    b, n_feat = x.shape[0], x.shape[-1]
    flat_x, flat_y = x.reshape(b, -1, n_feat).double(), (returns * episodes.mask).reshape(b, -1, 1).double()
    gram, rhs = flat_x.transpose(1, 2) @ flat_x, flat_x.transpose(1, 2) @ flat_y  # (B, F, F), (B, F, 1)
    eye = torch.eye(n_feat, dtype=torch.float64)
    for _ in range(5):
        coefficients = torch.linalg.solve(gram + reg * eye, rhs)
        if torch.isfinite(coefficients).all():
            break
        reg *= 10
    return (flat_x @ coefficients).reshape(returns.shape).to(returns.dtype)


def normalised_advantages(episodes: Episodes, gamma: float) -> Tensor:
    """A_t = R_t - b(s_t), standardised per task over its valid steps: (B, T, K), zero where masked."""
    with torch.no_grad():
        returns = discounted_returns(episodes.rewards, episodes.mask, gamma)
        advantages = (returns - linear_baseline(episodes, returns)) * episodes.mask
        count = episodes.mask.sum((1, 2), keepdim=True)
        mean = advantages.sum((1, 2), keepdim=True) / count
        var = (((advantages - mean) * episodes.mask) ** 2).sum((1, 2), keepdim=True) / count.clamp(min=2)
        return (advantages - mean) / (var.sqrt() + 1e-8) * episodes.mask
