"""The "pretrained" baseline of Finn et al. 2017 (section 5.1).

One network trained by ordinary regression on the pooled examples of all
meta-train tasks, then fine-tuned at meta-test with gradient descent on the K
support points. The paper fine-tunes "using an automatically tuned step size";
``tune_step_size`` picks it on meta-validation tasks from a fixed grid.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fewshot.algorithms.maml import MAML, TaskBatch

STEP_SIZE_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


class Pretrained(nn.Module):
    """Joint training on all tasks' data; adaptation is plain fine-tuning."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], finetune_lr: float = 0.01):
        super().__init__()
        # Fine-tuning is MAML's inner loop from the pre-trained weights.
        self.finetuner = MAML(model, loss_fn, inner_lr=finetune_lr)
        self.module, self.loss_fn = model, loss_fn

    def training_loss(self, tasks: TaskBatch) -> Tensor:
        """Ordinary regression on every support and query example of the batch, tasks pooled."""
        x = torch.cat([tasks.support_x, tasks.query_x], dim=1).flatten(0, 1)  # (B*(N+M), *x_shape)
        y = torch.cat([tasks.support_y, tasks.query_y], dim=1).flatten(0, 1)
        return self.loss_fn(self.module(x), y)

    def adaptation_curve(self, tasks: TaskBatch, max_steps: int) -> list[Tensor]:
        return self.finetuner.adaptation_curve(tasks, max_steps)

    def tune_step_size(self, tasks: TaskBatch, steps: int, grid: tuple[float, ...] = STEP_SIZE_GRID) -> float:
        """Set the fine-tuning step size to the grid value with the lowest query loss after ``steps`` steps."""

        def loss_after(lr: float) -> float:
            predictions = self.finetuner.adaptation_curve(tasks, steps, inner_lr=lr)[-1]
            return self.loss_fn(predictions, tasks.query_y).item()

        self.finetuner.inner_lr = min(grid, key=loss_after)
        return self.finetuner.inner_lr
