"""From a config to the method: the classification loss's reduction."""

import torch

from fewshot import config as cfg
from fewshot.experiment import build_method
from fewshot.tasks.base import TaskBatch


def _tiny_omniglot_maml(**keys):
    assignments = ["channels=4", "k_shot=2", "n_query=2", "eval_queries=2", *(f"{k}={v}" for k, v in keys.items())]
    return build_method(cfg.with_overrides(cfg.preset("omniglot-5w1s-maml"), assignments)).double()


def test_per_shot_loss_is_n_way_times_the_mean_so_the_papers_step_acts_n_way_times_larger():
    per_shot = _tiny_omniglot_maml(loss_reduction="per_shot", inner_lr=0.4)
    mean = _tiny_omniglot_maml(loss_reduction="mean", inner_lr=0.4 * 5)  # the same initial weights (seed 0)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(2).expand(3, 10)
    tasks = TaskBatch(torch.rand(3, 10, 1, 28, 28, generator=g, dtype=torch.float64), labels,
                      torch.rand(3, 10, 1, 28, 28, generator=g, dtype=torch.float64), labels)  # fmt: skip
    losses = []
    for method in (per_shot, mean):
        loss = method.meta_loss(tasks)
        losses.append((loss, torch.autograd.grad(loss, list(method.parameters()))))
    (loss_p, grads_p), (loss_m, grads_m) = losses
    assert torch.allclose(loss_p, 5 * loss_m, rtol=1e-12)  # 2 queries per class = k_shot: the query loss is 5 x the mean too
    for a, b in zip(grads_p, grads_m):
        assert torch.allclose(a, 5 * b, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(mean.meta_loss(tasks), _tiny_omniglot_maml(inner_lr=0.4).meta_loss(tasks))  # the step matters


def test_learner_authors_builds_the_authors_net_with_batch_norm_out_of_the_inner_loop():
    paper, authors = _tiny_omniglot_maml(), _tiny_omniglot_maml(learner="authors", loss_reduction="per_shot")
    assert paper.adapted_names == [n for n, _ in paper.module.named_parameters()]
    assert authors.module.authors and authors.module.head.in_features == 4  # the averaged 2x2 map of 4 channels
    norm_names = [n for n, _ in authors.module.named_parameters() if n not in authors.adapted_names]
    assert norm_names == [f"features.{i}.{p}" for i in (1, 4, 7, 10) for p in ("weight", "bias")]
    assert [n for n, p in authors.module.named_parameters() if not p.requires_grad] == norm_names[::2]  # no scale
