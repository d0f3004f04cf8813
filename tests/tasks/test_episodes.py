"""The episode sampler on a small synthetic collection whose every example knows its class."""

import pytest
import torch

from fewshot.tasks.data_root import DataError

from fewshot.tasks.episodes import ArrayCollection, EpisodeSampler, Episodes, accuracy_with_ci, check_disjoint


def collection(n_classes=10, per_class=8, uneven=False):
    # example value = its class id * 100 + its position, so episodes can be checked by content
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    if uneven:
        labels = torch.cat([labels, torch.full((5,), n_classes - 1)])
    data = (labels * 100 + torch.arange(len(labels))).float()[:, None]
    return ArrayCollection(data, labels)


@pytest.mark.parametrize("uneven", [False, True])
def test_episode_structure(uneven):
    col = collection(uneven=uneven)
    sampler = EpisodeSampler(col, classes=[0, 2, 4, 6, 8, 9], n_way=3, k_shot=2, q_queries=4)
    batch = sampler.sample(16, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (16, 6, 1) and batch.query_x.shape == (16, 12, 1)
    for e in range(16):
        # labels cover 0..N-1 exactly K (support) and Q (query) times
        assert torch.equal(torch.bincount(batch.support_y[e], minlength=3), torch.tensor([2, 2, 2]))
        assert torch.equal(torch.bincount(batch.query_y[e], minlength=3), torch.tensor([4, 4, 4]))
        support_class = (batch.support_x[e, :, 0] // 100).long()
        query_class = (batch.query_x[e, :, 0] // 100).long()
        for label in range(3):  # one original class per label, the same in support and query
            (cs,), (cq,) = support_class[batch.support_y[e] == label].unique(), query_class[batch.query_y[e] == label].unique()
            assert cs == cq and int(cs) in (0, 2, 4, 6, 8, 9)
        assert len(support_class.unique()) == 3
        # support and query disjoint
        assert not set(batch.support_x[e, :, 0].tolist()) & set(batch.query_x[e, :, 0].tolist())


def test_label_order_is_random_per_episode():
    sampler = EpisodeSampler(collection(), classes=range(10), n_way=5, k_shot=1, q_queries=1)
    batch = sampler.sample(50, torch.Generator().manual_seed(0))
    first_class = (batch.support_x[:, 0, 0] // 100).long()  # the class given label 0
    assert len(first_class.unique()) > 5


def test_same_seed_same_episodes_different_seed_different():
    sampler = EpisodeSampler(collection(), classes=range(10), n_way=5, k_shot=1, q_queries=2)
    a = sampler.sample_indices(20, torch.Generator().manual_seed(7))
    b = sampler.sample_indices(20, torch.Generator().manual_seed(7))
    c = sampler.sample_indices(20, torch.Generator().manual_seed(8))
    assert torch.equal(a.support_idx, b.support_idx) and torch.equal(a.query_idx, b.query_idx)
    assert not torch.equal(a.support_idx, c.support_idx)


def test_fixed_episodes_are_saved_and_reused(tmp_path):
    sampler = EpisodeSampler(collection(), classes=range(10), n_way=5, k_shot=1, q_queries=2)
    path = tmp_path / "test_episodes.pt"
    first = sampler.fixed_episodes(600, seed=3, path=path)
    assert len(first) == 600 and path.is_file()
    again = sampler.fixed_episodes(600, seed=999, path=path)  # the file wins over the seed
    assert torch.equal(first.query_idx, again.query_idx)
    assert torch.equal(Episodes.load(path).support_idx, first.support_idx)
    batches = list(sampler.batches(first, 256))
    assert [b.support_x.shape[0] for b in batches] == [256, 256, 88]
    with pytest.raises(DataError, match="another shape; delete it"):
        EpisodeSampler(collection(), classes=range(10), n_way=3, k_shot=1, q_queries=2).fixed_episodes(600, path=path)


def test_saved_episodes_of_another_split_or_broken_ones_are_refused_naming_the_file(tmp_path):
    data = collection(n_classes=20)
    train, test = (EpisodeSampler(data, classes=c, n_way=5, k_shot=1, q_queries=2) for c in (range(10), range(10, 20)))
    path = tmp_path / "test_episodes.pt"
    train.fixed_episodes(50, seed=3, path=path)  # saved by the training split's sampler: stale for the test split
    with pytest.raises(DataError, match="classes outside this split.*delete it"):
        test.fixed_episodes(50, path=path)
    good = test.fixed_episodes(50, path=tmp_path / "good.pt")
    broken = {
        "two classes under one label": good.__class__(good.support_idx, good.query_idx.roll(1, 0), good.support_y, good.query_y),
        "queries in the support set": good.__class__(good.support_idx, good.support_idx.repeat(1, 2), good.support_y, good.query_y),
    }
    for what, episodes in broken.items():
        episodes.save(path)
        with pytest.raises(DataError, match="stands for more than one class|in its own support set"):
            test.fixed_episodes(50, path=path)


def test_accuracy_with_ci():
    result = accuracy_with_ci(torch.tensor([1.0, 0.0] * 300))
    assert result["mean"] == 0.5 and result["n_episodes"] == 600
    assert abs(result["ci95"] - 1.96 * 0.5004 / 600**0.5) < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_way": 11}, "n_way=11 is larger than the 10 classes of this split; allowed: 1..10"),
        ({"k_shot": 5, "q_queries": 4}, "k_shot \\+ q_queries = 9 is more than the 8 examples of class 0"),
        ({"k_shot": 0}, "k_shot must be an integer >= 1"),
        ({"n_way": 0}, "n_way must be an integer >= 1"),
        ({"q_queries": -1}, "q_queries must be an integer >= 0"),
    ],
)
def test_bad_episode_shapes_are_named(kwargs, message):
    args = {"n_way": 5, "k_shot": 1, "q_queries": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(collection(), classes=range(10), **args)


def test_overlapping_splits_are_rejected():
    check_disjoint({"train": [0, 1], "val": [2], "test": [3, 4]})
    with pytest.raises(ValueError, match="class 2 is in splits 'val' and 'test'"):
        check_disjoint({"train": [0, 1], "val": [2], "test": [2, 4]})


def test_class_balanced_query_groups_split_every_task_s_queries_once():
    from fewshot.tasks.base import TaskBatch
    from fewshot.tasks.episodes import class_balanced_query_groups

    g = torch.Generator().manual_seed(0)
    # 2 tasks, 3 classes, 4 queries per class in a shuffled order; each query's x is its own id
    labels = torch.stack([torch.arange(3).repeat(4)[torch.randperm(12, generator=g)] for _ in range(2)])
    ids = torch.arange(24.0).view(2, 12, 1)
    tasks = TaskBatch(torch.zeros(2, 3, 1), torch.arange(3).expand(2, 3), ids, labels)
    groups = class_balanced_query_groups(tasks, n_way=3, group_size=6)
    assert len(groups) == 2
    for group in groups:
        assert group.query_x.shape == (2, 6, 1) and group.support_x is tasks.support_x
        assert (torch.bincount(group.query_y[0], minlength=3) == 2).all() and (torch.bincount(group.query_y[1], minlength=3) == 2).all()
        # each x keeps its label
        assert torch.equal(group.query_y, labels.gather(1, (group.query_x[..., 0] - torch.tensor([[0.0], [12.0]])).long()))
    together = torch.cat([group.query_x for group in groups], 1)
    assert torch.equal(together.sort(1).values, ids)  # every query exactly once
    assert len(class_balanced_query_groups(tasks, 3, 12)) == 1
    with pytest.raises(ValueError, match="group_size=4: must be a multiple of n_way=3"):
        class_balanced_query_groups(tasks, 3, 4)
    with pytest.raises(ValueError, match="group_size=9"):
        class_balanced_query_groups(tasks, 3, 9)  # 3 per class does not divide 4
    unbalanced = TaskBatch(*tasks[:3], torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="4 queries of each of its 3 classes"):
        class_balanced_query_groups(unbalanced, 3, 6)
