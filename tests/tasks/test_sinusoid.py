import math

import torch

from fewshot.tasks import sinusoid


def test_sampled_tasks_follow_the_paper_ranges():
    tasks = sinusoid.sample_tasks(2000, 10, 7, torch.Generator().manual_seed(0))
    assert tasks.support_x.shape == (2000, 10, 1) and tasks.query_y.shape == (2000, 7, 1)
    amplitude, phase = tasks.info[:, 0], tasks.info[:, 1]
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert -5.0 <= tasks.support_x.min() and tasks.query_x.max() <= 5.0
    # y = A sin(x - phi) on both sets of every task
    expected = amplitude[:, None, None] * torch.sin(tasks.query_x - phase[:, None, None])
    assert torch.allclose(tasks.query_y, expected)
    # the whole range is used, not a corner of it
    assert amplitude.max() > 4.9 and amplitude.min() < 0.2 and phase.max() > 3.1


def test_fixed_sets_are_reproducible_and_distinct():
    a, b = sinusoid.fixed_tasks("test", 600), sinusoid.fixed_tasks("test", 600)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    val = sinusoid.fixed_tasks("val", 600)
    assert not torch.equal(val.info, a.info)
    assert a.support_x.shape == (600, 20, 1) and a.query_x.shape == (600, 100, 1)


def test_fewer_shots_are_a_prefix_of_the_same_support_set():
    tasks = sinusoid.fixed_tasks("test", 10)
    five = sinusoid.with_shots(tasks, 5)
    assert torch.equal(five.support_x, tasks.support_x[:, :5]) and torch.equal(five.query_x, tasks.query_x)


def test_unknown_split_is_named():
    try:
        sinusoid.fixed_tasks("train", 5)
    except ValueError as e:
        assert "split must be one of ['test', 'val']" in str(e)
    else:
        raise AssertionError("no error")


def test_sinusoid_tasks_follow_the_task_distribution_interface():
    dist = sinusoid.SinusoidTasks(k_shot=5, n_query=3)
    a = dist.sample(4, torch.Generator().manual_seed(1))
    b = sinusoid.sample_tasks(4, 5, 3, torch.Generator().manual_seed(1))
    assert a.support_x.shape == (4, 5, 1) and all(torch.equal(x, y) for x, y in zip(a, b))
