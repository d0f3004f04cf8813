"""What a task is, for every algorithm: a support set to adapt on, a query set to score the adaptation.

Task distributions (sinusoids, N-way K-shot episodes, ...) all offer
``sample(meta_batch, generator) -> TaskBatch``: tensors stacked over the tasks of a
meta-batch, ready for a batched inner loop.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class TaskBatch(NamedTuple):
    """A meta-batch of tasks, stacked: B tasks, N support and M query examples each.

    ``info`` optionally describes each task (e.g. a sinusoid's amplitude and
    phase); only oracles read it.
    """

    support_x: Tensor  # (B, N, *x_shape)
    support_y: Tensor  # (B, N, *y_shape)
    query_x: Tensor  # (B, M, *x_shape)
    query_y: Tensor  # (B, M, *y_shape)
    info: Tensor | None = None  # (B, D)

    @property
    def support(self) -> tuple[Tensor, Tensor]:
        return self.support_x, self.support_y

    def to(self, device: torch.device | str) -> "TaskBatch":
        """Every tensor of the batch on ``device``."""
        return TaskBatch(*(None if t is None else t.to(device) for t in self))

    def task(self, i: int) -> "TaskBatch":
        """Task ``i`` alone, without the batch dimension."""
        info = None if self.info is None else self.info[i]
        return TaskBatch(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i], info)


class TaskDistribution(Protocol):
    """p(T): anything that samples meta-batches of tasks from an explicit generator."""

    def sample(self, meta_batch: int, generator: torch.Generator) -> TaskBatch: ...
