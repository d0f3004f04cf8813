"""Trust region policy optimisation (Schulman et al. 2015), the outer loop of MAML-RL.

The step solves H x = g by conjugate gradient, with H the Hessian of the mean KL
divergence (given as Hessian-vector products, never formed), scales x so that
the quadratic model of the KL equals ``max_kl`` (eq. 14 of the TRPO paper's
appendix C), and backtracks until the surrogate loss improves and the actual KL
is within ``max_kl``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def conjugate_gradient(matrix_vector: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10, tolerance: float = 1e-10) -> Tensor:
    """x with A x = b for a symmetric positive definite A given as ``matrix_vector(v) = A v``."""
    x = torch.zeros_like(b)
    residual, direction = b.clone(), b.clone()
    residual_norm = residual @ residual
    for _ in range(iterations):
        a_direction = matrix_vector(direction)
        step = residual_norm / (direction @ a_direction)
        x = x + step * direction
        residual = residual - step * a_direction
        new_norm = residual @ residual
        if new_norm < tolerance:
            break
        direction = residual + (new_norm / residual_norm) * direction
        residual_norm = new_norm
    return x


def hessian_vector_product(gradient: Tensor, inputs: Tensor, damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """v -> (d^2 f / d inputs^2) v + damping v, from ``gradient`` = df/d inputs built with ``create_graph``."""

    def product(vector: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(gradient @ vector, inputs, retain_graph=True)
        return hv + damping * vector

    return product


def natural_step(loss_gradient: Tensor, kl_hvp: Callable[[Tensor], Tensor], max_kl: float, cg_iterations: int) -> Tensor:
    """The largest step along -H^{-1} g whose quadratic KL model is ``max_kl``: -sqrt(2 max_kl / x'Hx) x."""
    x = conjugate_gradient(kl_hvp, loss_gradient, cg_iterations)
    quadratic = x @ kl_hvp(x)  # x' H x
    return -torch.sqrt(2 * max_kl / quadratic.clamp(min=1e-12)) * x


def line_search(
    evaluate: Callable[[Tensor], tuple[float, float]],
    theta: Tensor,
    step: Tensor,
    loss_before: float,
    max_kl: float,
    max_backtracks: int = 15,
    ratio: float = 0.5,
) -> tuple[Tensor, int, tuple[float, float]]:
    """theta + ratio^j step for the first j whose (loss, kl) = ``evaluate(.)`` improves the loss within ``max_kl``.

    Returns the new parameters, j and their (loss, kl); ``theta``, -1 and (loss_before, 0) when no step is accepted.
    """
    for j in range(max_backtracks):
        candidate = theta + ratio**j * step
        loss, kl = evaluate(candidate)
        if loss < loss_before and kl <= max_kl:
            return candidate, j, (loss, kl)
    return theta, -1, (loss_before, 0.0)
