"""Summary statistics over evaluation tasks."""

from __future__ import annotations

import math

import torch


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of its normal-approximation 95% confidence interval (1.96 standard errors)."""
    values = values.double().flatten()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(n)
