"""The paper's policy: an MLP (2 x 100, ReLU) giving the mean of a Gaussian with a learned log-std.

Functional like the rest of fewshot: ``distribution(module, params, obs)`` and
``log_prob`` take a parameter dict, so per-task adapted parameters (with a
leading task dimension, under ``vmap``) run the same code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fewshot.algorithms.maml import Params
from fewshot.models import mlp


class GaussianPolicy(nn.Module):
    """pi_theta(a | s) = N(mean_theta(s), diag(exp(log_std))^2)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (100, 100), init_std: float = 1.0):
        super().__init__()
        self.mean = mlp(obs_dim, hidden, act_dim)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean(obs), self.log_std.expand(*obs.shape[:-1], -1)


def distribution(policy: nn.Module, params: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, log_std) of pi_params(. | obs), both (..., act_dim)."""
    return functional_call(policy, params, (obs,))


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """log N(actions; mean, exp(log_std)^2), summed over the action dimension: (...)."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(p || q) of diagonal Gaussians, summed over the action dimension: (...)."""
    var_p, var_q = torch.exp(2 * log_std_p), torch.exp(2 * log_std_q)
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)
