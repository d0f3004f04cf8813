"""An oracle: a network that is told the task (e.g. a sinusoid's amplitude and phase).

The reference Finn et al. 2017 use in meta-RL (section 5.3, "an oracle policy
that receives the identity of the task as input"), here for regression: the
task descriptor ``TaskBatch.info`` is appended to every input, so no adaptation
is needed and its error bounds what the architecture can reach from data.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fewshot.algorithms.maml import TaskBatch


def with_task_info(x: Tensor, info: Tensor) -> Tensor:
    """x (B, M, F), info (B, D) -> (B, M, F + D)."""
    return torch.cat([x, info[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)


class Oracle(nn.Module):
    """Regression on (x, task descriptor); the model's input width is F + D."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.module, self.loss_fn = model, loss_fn

    def training_loss(self, tasks: TaskBatch) -> Tensor:
        if tasks.info is None:
            raise ValueError("the oracle needs task descriptors: TaskBatch.info is None")
        x = torch.cat([tasks.support_x, tasks.query_x], dim=1)
        y = torch.cat([tasks.support_y, tasks.query_y], dim=1)
        return self.loss_fn(self.module(with_task_info(x, tasks.info)), y)

    @torch.no_grad()
    def adaptation_curve(self, tasks: TaskBatch, max_steps: int) -> list[Tensor]:
        """The same prediction at every step: the oracle needs no support set."""
        return [self.module(with_task_info(tasks.query_x, tasks.info))] * (max_steps + 1)
