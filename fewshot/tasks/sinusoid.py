"""Sinusoid regression, the task distribution of Finn et al. 2017, section 5.1.

A task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0] and phase
phi ~ U[0, pi]; inputs x ~ U[-5, 5]. The support set has K points, the query
set points of the same sinusoid. The meta-train, meta-validation and meta-test
parts are disjoint random streams of the continuous distribution: training
batches come from the run's own generator, validation and test tasks from
fixed seeds that no training run uses, so every method is scored on the very
same tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fewshot.tasks.base import TaskBatch

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)

VALIDATION_SEED = 1_000_003  # seeds of the fixed meta-val / meta-test task sets
TEST_SEED = 2_000_003


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


@dataclass(frozen=True)
class Sinusoids:
    """B sinusoids, y = amplitude * sin(x - phase)."""

    amplitude: Tensor  # (B,)
    phase: Tensor  # (B,)

    @classmethod
    def sample(cls, n_tasks: int, generator: torch.Generator) -> "Sinusoids":
        return cls(_uniform((n_tasks,), *AMPLITUDE, generator), _uniform((n_tasks,), *PHASE, generator))

    def __len__(self) -> int:
        return self.amplitude.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        """x (B, M, 1) -> y (B, M, 1)."""
        return self.amplitude[:, None, None] * torch.sin(x - self.phase[:, None, None])

    def sample_x(self, n_points: int, generator: torch.Generator) -> Tensor:
        return _uniform((len(self), n_points, 1), *X_RANGE, generator)  # (B, M, 1)

    def info(self) -> Tensor:
        return torch.stack([self.amplitude, self.phase], dim=1)  # (B, 2)

    def episodes(self, k_shot: int, n_query: int, generator: torch.Generator) -> TaskBatch:
        """K support and ``n_query`` query points per sinusoid, drawn independently."""
        xs, xq = self.sample_x(k_shot, generator), self.sample_x(n_query, generator)
        return TaskBatch(xs, self(xs), xq, self(xq), self.info())


def sample_tasks(n_tasks: int, k_shot: int, n_query: int, generator: torch.Generator) -> TaskBatch:
    """A meta-batch of sinusoid regression tasks."""
    return Sinusoids.sample(n_tasks, generator).episodes(k_shot, n_query, generator)


def fixed_tasks(split: str, n_tasks: int, max_shot: int = 20, n_query: int = 100) -> TaskBatch:
    """The seeded meta-val or meta-test set shared by every method and every run.

    Each task has ``max_shot`` support points; evaluating with K < max_shot uses
    the first K of them, so the K = 5 support set is contained in the K = 10 one.
    The query set is ``n_query`` points of the same sinusoid.
    """
    seeds = {"val": VALIDATION_SEED, "test": TEST_SEED}
    if split not in seeds:
        raise ValueError(f"split must be one of {sorted(seeds)}, got {split!r}")
    return sample_tasks(n_tasks, max_shot, n_query, torch.Generator().manual_seed(seeds[split]))


def with_shots(tasks: TaskBatch, k_shot: int) -> TaskBatch:
    """The same tasks with only the first ``k_shot`` support points."""
    return tasks._replace(support_x=tasks.support_x[:, :k_shot], support_y=tasks.support_y[:, :k_shot])


@dataclass(frozen=True)
class SinusoidTasks:
    """The task distribution as a ``TaskDistribution``: K support and ``n_query`` query points per task."""

    k_shot: int = 10
    n_query: int = 10

    def sample(self, meta_batch: int, generator: torch.Generator) -> TaskBatch:
        return sample_tasks(meta_batch, self.k_shot, self.n_query, generator)
