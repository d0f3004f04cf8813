"""A meta-batch's forward passes without ``vmap``, for plain MLPs.

On MAML's batched path every task's parameters carry a leading task dimension, and the
loss of every task is taken in one call. ``torch.func.vmap`` does that for any module. For
an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations the same pass is
one ``baddbmm`` per layer: on the sinusoid MLP (1-40-40-1, 25 tasks, 10 points) one
forward pass took 69 us against vmap's 432, a whole second-order meta-gradient 1.4 ms
against 2.0 (one CPU thread; BENCHMARKS.md, "Sinusoid speed"). Same math in another
order of operations: float64 meta-gradients equal the per-task loop's (tests).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

Params = dict[str, Tensor]

_ACTIVATIONS: dict[type, Callable[[Tensor], Tensor]] = {
    nn.ReLU: torch.relu,
    nn.Tanh: torch.tanh,
    nn.Sigmoid: torch.sigmoid,
    nn.Identity: lambda h: h,
}


def _plan(module: nn.Module) -> list[tuple[str, Callable[[Tensor], Tensor] | None, bool]] | None:
    """The layers of an ``nn.Sequential`` of Linear layers and elementwise activations, in order:
    ``(name, None, has_bias)`` for a Linear, ``(name, activation, False)`` otherwise; None for any
    other module."""
    if type(module) is not nn.Sequential or len(module) == 0:
        return None
    plan = []
    for name, layer in module.named_children():
        if layer._forward_hooks or layer._forward_pre_hooks:
            return None
        if type(layer) is nn.Linear:
            plan.append((name, None, layer.bias is not None))
        elif type(layer) in _ACTIVATIONS:
            plan.append((name, _ACTIVATIONS[type(layer)], False))
        else:
            return None
    if module._forward_hooks or module._forward_pre_hooks or all(act is not None for _, act, _ in plan):
        return None
    return plan


def batched_loss(module: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Params, Tensor, Tensor], Tensor] | None:
    """``(params, x, y) -> (B,)`` losses, task ``i`` the loss of the module with ``params[...][i]``
    on ``x[i]``, ``y[i]``, as ``vmap`` of the per-task loss gives them; None where the module is not
    an ``nn.Sequential`` of Linear layers and ReLU / Tanh / Sigmoid / Identity (then use vmap)."""
    plan = _plan(module)
    if plan is None:
        return None
    per_task_loss = vmap(loss_fn)

    def forward(params: Params, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, points, features): Linear acts on the last dimension
        for name, activation, has_bias in plan:
            if activation is not None:
                h = activation(h)
            elif has_bias:
                h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
            else:
                h = torch.bmm(h, params[f"{name}.weight"].transpose(1, 2))
        return h.reshape(*x.shape[:-1], h.shape[-1])

    def loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        predictions = forward(params, x)
        if loss_fn is F.mse_loss and predictions.shape == y.shape:  # its per-task mean, without vmap's dispatch
            return (predictions - y).square().flatten(1).mean(1)
        return per_task_loss(predictions, y)

    return loss
