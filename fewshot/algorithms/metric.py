"""Metric-learning baselines: Prototypical Networks (Snell et al. 2017) and Matching Networks (Vinyals et al. 2016).

Both embed the support and query examples with one network and classify a query
by its similarity to the support set, so adaptation is a forward pass, not
gradient steps; ``adaptation_curve`` returns the same prediction at every step
count so they sit in the same tables as MAML. Each episode is embedded on its own
(support and query together), so batch-norm statistics never cross episodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot import kernels
from fewshot.tasks.base import TaskBatch


def class_means(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """(S, D) embeddings, (S,) labels 0..N-1 -> (N, D) per-class means (the prototypes c_k, eq. 1)."""
    sums = embeddings.new_zeros(n_way, embeddings.shape[1]).index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=n_way).clamp_min(1).to(embeddings.dtype)
    return sums / counts[:, None]


def prototype_logits(support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
    """Snell et al. eq. 2: logits = -squared Euclidean distance to each prototype; (Q, D) -> (Q, N)."""
    return -torch.cdist(query, class_means(support, support_y, n_way)).pow(2)


def matching_log_probs(support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
    """Vinyals et al. eq. 1-2 without full context embeddings: softmax attention over cosine similarities.

    P(y | x) = sum_i a(x, x_i) onehot(y_i), a = softmax_i cos(f(x), g(x_i)) with f = g; (Q, D) -> (Q, N) log P.
    """
    attention = F.softmax(F.normalize(query, dim=1) @ F.normalize(support, dim=1).T, dim=1)  # (Q, S)
    probabilities = attention @ F.one_hot(support_y, n_way).to(attention.dtype)  # (Q, N)
    return probabilities.clamp_min(1e-12).log()


class MetricClassifier(nn.Module):
    """An embedding network and a rule turning (support, query) embeddings into query log-scores."""

    def __init__(self, encoder: nn.Module, n_way: int, rule):
        super().__init__()
        self.encoder, self.n_way, self.rule = encoder, n_way, rule

    def episode_scores(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """One episode: (S, ...), (S,), (Q, ...) -> (Q, N) logits or log-probabilities."""
        z = kernels.call(self.encoder, torch.cat([support_x, query_x])).flatten(1)  # (S + Q, D), one batch-norm batch
        return self.rule(z[: len(support_x)], support_y, z[len(support_x) :], self.n_way)

    def scores(self, tasks: TaskBatch) -> Tensor:
        """(B, Q, N), episode by episode."""
        return torch.stack([self.episode_scores(*tasks.task(i)[:3]) for i in range(len(tasks.support_x))])

    def training_loss(self, tasks: TaskBatch) -> Tensor:
        """Cross-entropy of the query labels, averaged over the episodes of the meta-batch."""
        scores = self.scores(tasks)
        return F.cross_entropy(scores.flatten(0, 1), tasks.query_y.flatten())

    @torch.no_grad()
    def adaptation_curve(self, tasks: TaskBatch, max_steps: int) -> list[Tensor]:
        return [self.scores(tasks)] * (max_steps + 1)


def prototypical_network(encoder: nn.Module, n_way: int) -> MetricClassifier:
    return MetricClassifier(encoder, n_way, prototype_logits)


def matching_network(encoder: nn.Module, n_way: int) -> MetricClassifier:
    return MetricClassifier(encoder, n_way, matching_log_probs)
