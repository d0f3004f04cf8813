"""Task distributions: what a task is, how tasks are sampled and split."""

from fewshot.tasks.base import TaskBatch, TaskDistribution

__all__ = ["TaskBatch", "TaskDistribution"]
