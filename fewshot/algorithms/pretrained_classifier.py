"""The classification baselines of the few-shot papers: pre-train, then fine-tune or match nearest neighbours.

An ordinary classifier is trained on all meta-train classes at once (the
examples of the sampled episodes, with their original class ids), then at
meta-test (a) its features get a fresh N-way head and everything is fine-tuned
on the support set by gradient descent (the "fine-tuning" baseline of Vinyals et
al. 2016 / Ravi & Larochelle 2017), or (b) each query takes the label of its
nearest support example in the pre-trained feature space (cosine similarity).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot import kernels
from fewshot.algorithms.maml import MAML
from fewshot.tasks.base import TaskBatch

# Fine-tuning step sizes tried on the meta-validation episodes (``tune_step_size``).
STEP_SIZE_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


class PretrainedClassifier(nn.Module):
    """features -> Linear(all meta-train classes); evaluated by fine-tuning or nearest neighbour."""

    def __init__(self, features: nn.Module, feature_dim: int, train_classes: Sequence[int], n_way: int,
                 evaluation: str = "finetune", finetune_lr: float = 0.01):  # fmt: skip
        super().__init__()
        if evaluation not in ("finetune", "nearest"):
            raise ValueError(f"evaluation must be finetune or nearest, got {evaluation!r}")
        self.features, self.n_way, self.evaluation, self.finetune_lr = features, n_way, evaluation, finetune_lr
        self.head = nn.Linear(feature_dim, len(train_classes))
        index = torch.full((max(train_classes) + 1,), -1, dtype=torch.int64)
        index[torch.tensor(list(train_classes))] = torch.arange(len(train_classes))
        self.register_buffer("class_index", index, persistent=False)  # original class id -> head output

    def training_loss(self, tasks: TaskBatch) -> Tensor:
        """Cross-entropy over all meta-train classes, on every example of the episodes pooled."""
        if tasks.info is None:
            raise ValueError("the pre-trained classifier needs the episodes' class ids (TaskBatch.info)")
        x = torch.cat([tasks.support_x, tasks.query_x], dim=1).flatten(0, 1)  # (B*(NK+NQ), C, H, W)
        episode_labels = torch.cat([tasks.support_y, tasks.query_y], dim=1)  # (B, NK+NQ)
        labels = self.class_index[torch.gather(tasks.info, 1, episode_labels)].flatten()
        return F.cross_entropy(self.head(kernels.call(self.features, x).flatten(1)), labels)

    def adaptation_curve(self, tasks: TaskBatch, max_steps: int, query_batch: int | None = None) -> list[Tensor]:
        """Query scores after 0..``max_steps`` fine-tuning steps (``query_batch``: see ``MAML.adaptation_curve``)."""
        if self.evaluation == "nearest":
            if query_batch is not None:
                raise ValueError("nearest neighbour scores support and queries in one pass: no query_batch")
            with torch.no_grad():
                return [self._nearest_neighbour_scores(tasks)] * (max_steps + 1)
        return self._finetuner().adaptation_curve(tasks, max_steps, query_batch=query_batch)

    def tune_step_size(self, validation_accuracy: Callable[[], float], grid: tuple[float, ...] = STEP_SIZE_GRID) -> float:
        """Set the fine-tuning step size to the grid value under which ``validation_accuracy()`` is highest.

        ``validation_accuracy`` scores this classifier, as it is, on meta-validation
        episodes; ties go to the smaller step size.
        """
        if self.evaluation != "finetune":
            raise ValueError(f"only the fine-tuning evaluation has a step size, not {self.evaluation!r}")

        def accuracy_with(lr: float) -> float:
            self.finetune_lr = lr
            return validation_accuracy()

        accuracies = {lr: accuracy_with(lr) for lr in grid}
        self.finetune_lr = max(grid, key=lambda lr: (accuracies[lr], -lr))
        return self.finetune_lr

    def _finetuner(self) -> MAML:
        """Pre-trained features with a fresh, zero N-way head, fine-tuned by MAML's inner loop (SGD)."""
        head = nn.Linear(self.head.in_features, self.n_way, device=self.head.weight.device, dtype=self.head.weight.dtype)  # where the features are
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return MAML(nn.Sequential(self.features, nn.Flatten(), head), F.cross_entropy, inner_lr=self.finetune_lr)

    def _nearest_neighbour_scores(self, tasks: TaskBatch) -> Tensor:
        """(B, Q, N): per class, the best cosine similarity of a query to that class's support examples."""
        scores = []
        for i in range(len(tasks.support_x)):
            task = tasks.task(i)
            z = F.normalize(self.features(torch.cat([task.support_x, task.query_x])).flatten(1), dim=1)
            support, query = z[: len(task.support_x)], z[len(task.support_x) :]
            similarity = query @ support.T  # (Q, S)
            per_class = similarity.new_full((len(query), self.n_way), -2.0).scatter_reduce(
                1, task.support_y.expand(len(query), -1), similarity, reduce="amax"
            )
            scores.append(per_class)
        return torch.stack(scores)
