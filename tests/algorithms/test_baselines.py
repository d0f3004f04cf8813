"""The classification baselines: scoring rules by hand, and real learning on Omniglot."""

import math

import pytest
import torch

from fewshot.algorithms.metric import class_means, matching_log_probs, prototype_logits


def test_prototypes_are_class_means_and_logits_negative_squared_distances():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1])
    assert torch.equal(class_means(support, labels, 2), torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    query = torch.tensor([[1.0, 1.0]])
    # distances^2 to (1, 0) and (0, 4): 1 and 1 + 9 = 10
    assert torch.allclose(prototype_logits(support, labels, query, 2), torch.tensor([[-1.0, -10.0]]))


def test_matching_network_attends_by_cosine_similarity():
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # cosines 1, 0, 0 -> attention e / (e + 2), 1 / (e + 2), 1 / (e + 2)
    e = math.e
    expected = torch.tensor([[math.log(e / (e + 2)), math.log(2 / (e + 2))]])
    assert torch.allclose(matching_log_probs(support, labels, query, 2), expected)


# (method, overrides, accuracy floor): chance is 0.2; 100 test episodes x 25 queries give a CI of about +-0.02.
# The pre-trained classifier learns 4,400 classes at once, so it gets more iterations than the episodic methods.
BASELINES = [
    ("protonet", ["meta_batch=4", "iterations=100", "eval_steps=0"], 0.35),
    ("matchingnet", ["meta_batch=4", "iterations=100", "eval_steps=0"], 0.35),
    ("finetune", ["meta_batch=8", "iterations=300", "eval_steps=5", "inner_lr=0.5"], 0.3),
    ("nearest", ["meta_batch=8", "iterations=300", "eval_steps=0"], 0.3),
]


@pytest.mark.parametrize("method, overrides, floor", BASELINES)
def test_baseline_beats_chance_on_omniglot(method, overrides, floor, tmp_path, shared_data, omniglot_cache, monkeypatch):
    from fewshot.config import preset, with_overrides
    from fewshot.evaluate import evaluate
    from fewshot.train import prepare_run_dir, train

    monkeypatch.setenv("FEWSHOT_DATA", str(shared_data))
    monkeypatch.setenv("FEWSHOT_CACHE", str(omniglot_cache))
    common = ["channels=8", "val_every=100", "n_val_tasks=20", "n_test_tasks=100", "eval_queries=5"]
    config = with_overrides(preset(f"omniglot-5w1s-{method}"), common + overrides)
    config, _ = prepare_run_dir(tmp_path / method, config, False, {})
    result = evaluate(train(tmp_path / method, config, progress=False), config)
    assert result["metric"] == "accuracy" and result["n_tasks"] == 100
    assert result["mean"] > floor
    if method == "finetune":  # the preset picks its step size on the validation episodes
        from fewshot.algorithms.pretrained_classifier import STEP_SIZE_GRID

        assert result["finetune_lr"] in STEP_SIZE_GRID


def test_an_episode_is_scored_alone():
    from fewshot.algorithms.metric import prototypical_network
    from fewshot.models import Conv4
    from fewshot.tasks.base import TaskBatch

    torch.manual_seed(0)
    net = prototypical_network(Conv4(3, hidden=4, image_size=16).features, 3)
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(4, 3, 1, 16, 16, generator=g), torch.arange(3).expand(4, 3),
                      torch.rand(4, 6, 1, 16, 16, generator=g), torch.arange(3).repeat(2).expand(4, 6))  # fmt: skip
    together = net.adaptation_curve(batch, 0)[0][0]
    alone = net.adaptation_curve(TaskBatch(*(t[:1] for t in batch[:4])), 0)[0][0]
    assert torch.allclose(together, alone, atol=1e-6)


def test_finetune_step_size_is_picked_by_validation_accuracy_ties_to_the_smaller():
    from fewshot.algorithms.pretrained_classifier import PretrainedClassifier
    from fewshot.tasks.base import TaskBatch

    # Identity features on 2-d points: class c sits at 3 * e_c, so one SGD step on the zero head separates them.
    torch.manual_seed(0)
    centres = 3 * torch.eye(2)
    support_y, query_y = torch.arange(2).expand(4, 2), torch.arange(2).repeat(5).expand(4, 10)
    batch = TaskBatch(centres[support_y] + 0.1 * torch.randn(4, 2, 2), support_y,
                      centres[query_y] + 0.1 * torch.randn(4, 10, 2), query_y)  # fmt: skip
    classifier = PretrainedClassifier(torch.nn.Identity(), 2, [0, 1], n_way=2, finetune_lr=0.5)

    def accuracy():
        return (classifier.adaptation_curve(batch, 1)[-1].argmax(-1) == batch.query_y).float().mean().item()

    # lr 0 leaves the zero head: every logit ties, argmax says class 0, half right. 1.0 and 2.0 both get all right.
    assert accuracy() == 1.0
    assert classifier.tune_step_size(accuracy, grid=(0.0, 2.0, 1.0)) == 1.0
    assert classifier.finetune_lr == 1.0
    assert classifier.tune_step_size(accuracy, grid=(0.0,)) == 0.0 and accuracy() == 0.5
    with pytest.raises(ValueError, match="fine-tuning"):
        PretrainedClassifier(torch.nn.Identity(), 2, [0, 1], n_way=2, evaluation="nearest").tune_step_size(accuracy)
    # the fresh head for fine-tuning follows the classifier's dtype (and device: a GPU run crashed here)
    classifier.double()
    double = TaskBatch(batch.support_x.double(), support_y, batch.query_x.double(), query_y)
    assert classifier.adaptation_curve(double, 1)[-1].dtype == torch.float64
