"""N-way K-shot episodes over any labelled collection, with class splits and fixed test episodes.

A classification task (Vinyals et al. 2016; Finn et al. 2017 section 5.2) is an
episode: N classes drawn from one split, K labelled support examples per class to
adapt on and Q query examples per class to score the adaptation, support and
query disjoint, labels re-mapped to 0..N-1 in a random order. Everything is
drawn from an explicit ``torch.Generator``, so a seed gives the same episodes on
any machine.

A *collection* is anything with ``labels`` (a 1-D integer tensor, one class id
per example) and ``load(indices) -> Tensor`` (the examples, float, stacked);
``ArrayCollection`` holds images in memory or memory-mapped, other modules
provide Omniglot, miniImageNet, folders and ``torch.utils.data.Dataset``s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from fewshot.checkpoint import load_checkpoint, save_checkpoint
from fewshot.metrics import mean_ci95
from fewshot.tasks.data_root import DataError
from fewshot.tasks.base import TaskBatch



def class_balanced_query_groups(tasks: TaskBatch, n_way: int, group_size: int) -> list[TaskBatch]:
    """The tasks again, once per group of their queries: each group holds ``group_size // n_way`` queries of every class.

    Every task must have the same number Q of queries of each class and
    ``group_size`` must be a multiple of ``n_way`` dividing ``n_way * Q``. The
    support sets are shared; group j takes each class's queries j*q .. (j+1)*q - 1
    in their order in the episode. A model whose batch norm uses the statistics of
    the batch it is given normalises each group with its own, as when it scored a
    query set of that size at meta-training.
    """
    n_tasks, n_queries = tasks.query_y.shape[:2]
    per_group, per_class = group_size // n_way, n_queries // n_way
    if per_group < 1 or group_size % n_way or n_queries % n_way or per_class % per_group:
        raise ValueError(f"group_size={group_size}: must be a multiple of n_way={n_way} dividing the {n_queries} queries of a task")
    by_class = torch.argsort(tasks.query_y, dim=1, stable=True).view(n_tasks, n_way, per_class)
    sorted_labels = tasks.query_y.gather(1, by_class.flatten(1)).view(n_tasks, n_way, per_class)
    first_of_class = sorted_labels[..., 0]  # (B, n_way): must be n_way different labels
    if not ((sorted_labels == sorted_labels[..., :1]).all() and (first_of_class[:, 1:] > first_of_class[:, :-1]).all()):
        raise ValueError(f"every task needs {per_class} queries of each of its {n_way} classes")
    groups = []
    for start in range(0, per_class, per_group):
        index = by_class[..., start : start + per_group].flatten(1)  # (B, n_way * per_group)
        x_index = index.view(*index.shape, *[1] * (tasks.query_x.dim() - 2)).expand(-1, -1, *tasks.query_x.shape[2:])
        groups.append(TaskBatch(tasks.support_x, tasks.support_y, tasks.query_x.gather(1, x_index),
                                tasks.query_y.gather(1, index), tasks.info))  # fmt: skip
    return groups


class Collection(Protocol):
    labels: Tensor  # (n_examples,) int64 class ids

    def load(self, indices: Tensor) -> Tensor: ...  # (len(indices), *example_shape) float


@dataclass
class ArrayCollection:
    """Examples in an array (uint8 images are scaled to [0, 1]); a NumPy memory map stays on disk."""

    data: np.ndarray | Tensor  # (n_examples, *example_shape)
    labels: Tensor  # (n_examples,)

    def __post_init__(self):
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if len(self.data) != len(self.labels):
            raise ValueError(f"data has {len(self.data)} examples but labels has {len(self.labels)}")

    def load(self, indices: Tensor) -> Tensor:
        rows = self.data[np.asarray(indices)] if isinstance(self.data, np.ndarray) else self.data[indices]
        rows = torch.as_tensor(np.ascontiguousarray(rows) if isinstance(rows, np.ndarray) else rows)
        return rows.float().div_(255.0) if rows.dtype == torch.uint8 else rows.float()


def check_disjoint(splits: Mapping[str, Sequence[int]]) -> None:
    """Raise if a class appears in two splits (or twice in one): meta-test classes must be unseen."""
    seen: dict[int, str] = {}
    for name, classes in splits.items():
        for c in classes:
            c = int(c)
            if c in seen:
                where = f"twice in split {name!r}" if seen[c] == name else f"in splits {seen[c]!r} and {name!r}"
                raise ValueError(f"splits overlap: class {c} is {where}; splits must share no class")
            seen[c] = name


@dataclass(frozen=True)
class Episodes:
    """A set of episodes as indices into a collection: (E, N*K) support and (E, N*Q) query."""

    support_idx: Tensor  # (E, N*K) int64
    query_idx: Tensor  # (E, N*Q) int64
    support_y: Tensor  # (E, N*K) labels 0..N-1
    query_y: Tensor  # (E, N*Q)

    def __len__(self) -> int:
        return self.support_idx.shape[0]

    def save(self, path: Path) -> None:
        """Atomically (temp file, fsync, rename); loads with ``weights_only=True``."""
        save_checkpoint(Path(path), {k: getattr(self, k) for k in ("support_idx", "query_idx", "support_y", "query_y")})

    @classmethod
    def load(cls, path: Path) -> "Episodes":
        keys = ("support_idx", "query_idx", "support_y", "query_y")
        state = load_checkpoint(Path(path), required=keys)  # a ConfigError naming the file otherwise
        return cls(**{k: state[k] for k in keys})


class EpisodeSampler:
    """N-way K-shot episodes with Q queries per class over the given classes of a collection.

    Args:
        collection: examples with ``labels`` and ``load(indices)``.
        classes: the class ids of one split (meta-train, meta-val or meta-test).
        n_way, k_shot, q_queries: N, K and Q.
    """

    def __init__(self, collection: Collection, classes: Sequence[int], n_way: int, k_shot: int, q_queries: int):
        for name, value, low in (("n_way", n_way, 1), ("k_shot", k_shot, 1), ("q_queries", q_queries, 0)):
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        classes = [int(c) for c in classes]
        if any(c < 0 for c in classes):
            raise ValueError(f"classes must be class ids >= 0, got {min(classes)}")
        check_disjoint({"classes": classes})
        if n_way > len(classes):
            raise ValueError(f"n_way={n_way} is larger than the {len(classes)} classes of this split; allowed: 1..{len(classes)}")
        self.collection, self.classes = collection, torch.tensor(classes)
        self.n_way, self.k_shot, self.q_queries = n_way, k_shot, q_queries
        order = torch.argsort(collection.labels, stable=True)
        counts = torch.bincount(collection.labels, minlength=max(classes) + 1)
        starts = torch.cumsum(counts, 0) - counts
        self._members = [order[starts[c] : starts[c] + counts[c]] for c in classes]  # example indices per class
        smallest = min(range(len(classes)), key=lambda i: len(self._members[i]))
        if len(self._members[smallest]) < k_shot + q_queries:
            raise ValueError(
                f"k_shot + q_queries = {k_shot + q_queries} is more than the {len(self._members[smallest])} examples of "
                f"class {classes[smallest]}; allowed: k_shot + q_queries <= {len(self._members[smallest])}"
            )
        sizes = {len(m) for m in self._members}
        # Equal class sizes (Omniglot: 20 drawings) allow one vectorised draw for all N classes.
        self._table = torch.stack(self._members) if len(sizes) == 1 else None

    def sample_indices(self, n_episodes: int, generator: torch.Generator) -> Episodes:
        """``n_episodes`` episodes; the class order of each is its label map (class i -> label i)."""
        n, k, q = self.n_way, self.k_shot, self.q_queries
        chosen = torch.stack([torch.randperm(len(self.classes), generator=generator)[:n] for _ in range(n_episodes)])
        if self._table is not None:  # (E, N, k+q) without a Python loop over classes
            per_class = self._table.shape[1]
            picks = torch.rand(n_episodes, n, per_class, generator=generator).argsort(dim=2)[..., : k + q]
            members = torch.gather(self._table[chosen], 2, picks)
        else:
            members = torch.stack([
                torch.stack([self._members[c][torch.randperm(len(self._members[c]), generator=generator)[: k + q]] for c in row])
                for row in chosen.tolist()
            ])  # fmt: skip
        labels = torch.arange(n).repeat_interleave
        return Episodes(
            support_idx=members[..., :k].reshape(n_episodes, n * k),
            query_idx=members[..., k:].reshape(n_episodes, n * q),
            support_y=labels(k).expand(n_episodes, -1).clone(),
            query_y=labels(q).expand(n_episodes, -1).clone(),
        )

    def load(self, episodes: Episodes) -> TaskBatch:
        """The examples of the episodes, stacked: (E, N*K, *shape) support and (E, N*Q, *shape) query.

        ``info`` holds each episode's original class ids in label order, (E, N): what a
        baseline trained by ordinary classification over all classes of the split needs.
        """
        e, nk, nq = len(episodes), episodes.support_idx.shape[1], episodes.query_idx.shape[1]
        x = self.collection.load(torch.cat([episodes.support_idx, episodes.query_idx], dim=1).flatten())
        x = x.reshape(e, nk + nq, *x.shape[1:])
        classes = self.collection.labels[episodes.support_idx].reshape(e, self.n_way, self.k_shot)[:, :, 0]  # (E, N)
        return TaskBatch(x[:, :nk], episodes.support_y, x[:, nk:], episodes.query_y, classes)

    def sample(self, meta_batch: int, generator: torch.Generator) -> TaskBatch:
        """A meta-batch of episodes, ready for a batched inner loop (the ``TaskDistribution`` interface)."""
        return self.load(self.sample_indices(meta_batch, generator))

    def fixed_episodes(self, n_episodes: int = 600, seed: int = 0, path: Path | None = None) -> Episodes:
        """The seeded evaluation episodes every method is scored on; saved to (and read back from) ``path``.

        A saved file is used only if it was made for the same N, K and Q; the
        indices in it are the episodes, whatever the code that drew them.
        """
        if path is not None and Path(path).is_file():
            saved = Episodes.load(path)
            shape = (n_episodes, self.n_way * self.k_shot, self.n_way * self.q_queries)
            if (len(saved), saved.support_idx.shape[1], saved.query_idx.shape[1]) != shape:
                raise DataError(f"{path}: holds episodes of another shape; delete it to draw them again, or choose another path")
            problem = self._problem_with(saved)
            if problem:
                raise DataError(f"{path}: {problem} (a stale or foreign file); delete it to draw the episodes again")
            return saved
        episodes = self.sample_indices(n_episodes, torch.Generator().manual_seed(seed))
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            episodes.save(path)
        return episodes

    def _problem_with(self, episodes: Episodes) -> str | None:
        """What makes saved episodes not episodes of this sampler (None if nothing): indices outside the
        collection, classes outside this split, a label standing for two classes, a query in its support set."""
        n_examples = len(self.collection.labels)
        indices = torch.cat([episodes.support_idx, episodes.query_idx], 1)
        labels = torch.cat([episodes.support_y, episodes.query_y], 1)
        if indices.dtype != torch.int64 or labels.dtype != torch.int64 or indices.min() < 0 or indices.max() >= n_examples:
            return f"its indices are not those of this collection's {n_examples} examples"
        if labels.min() < 0 or labels.max() >= self.n_way:
            return f"its labels are not 0..{self.n_way - 1}"
        classes = self.collection.labels[indices]
        if not torch.isin(classes, self.classes).all():
            return "its episodes use classes outside this split"
        class_of_label = torch.full((len(episodes), self.n_way), -1, dtype=classes.dtype).scatter_(1, labels, classes)
        if not torch.equal(class_of_label.gather(1, labels), classes):
            return "a label in its episodes stands for more than one class"
        if (episodes.support_idx[:, :, None] == episodes.query_idx[:, None, :]).any():
            return "a query of its episodes is in its own support set"
        return None

    def batches(self, episodes: Episodes, batch_size: int) -> Iterator[TaskBatch]:
        """The episodes in order, ``batch_size`` at a time."""
        for start in range(0, len(episodes), batch_size):
            part = Episodes(*(t[start : start + batch_size] for t in (episodes.support_idx, episodes.query_idx, episodes.support_y, episodes.query_y)))
            yield self.load(part)


def accuracy_with_ci(correct_per_episode: Tensor) -> dict:
    """Mean accuracy over episodes and its 95% confidence interval, as the papers report."""
    mean, ci95 = mean_ci95(correct_per_episode)
    return {"metric": "accuracy", "mean": mean, "ci95": ci95, "n_episodes": int(correct_per_episode.numel())}
