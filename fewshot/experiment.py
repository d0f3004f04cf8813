"""From a Config to the objects a run needs: the method, its task stream, its validation metric.

Two families share one interface: sinusoid regression (error: MSE, lower is
better) and N-way K-shot classification on Omniglot or miniImageNet (error:
accuracy, higher is better; the learner is the paper's Conv4).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.algorithms import MAML, Oracle, Pretrained, TaskBatch
from fewshot.algorithms.meta_lstm import MetaLSTM
from fewshot.algorithms.metric import matching_network, prototypical_network
from fewshot.algorithms.pretrained_classifier import PretrainedClassifier
from fewshot.config import SINUSOID_VAL_SHOTS, Config, ConfigError
from fewshot.device import device_of
from fewshot.models import Conv4, maml_init_, mlp
from fewshot.tasks import sinusoid
from fewshot.tasks.data_root import cache_root
from fewshot.tasks.episodes import EpisodeSampler, class_balanced_query_groups

TASK_INFO_FEATURES = 2  # a sinusoid's (amplitude, phase), given to the oracle only


def build_method(config: Config) -> nn.Module:
    """The learner for ``config``, initialised from ``config.seed``."""
    torch.manual_seed(config.seed)
    if config.dataset != "sinusoid":
        learner = _conv_learner(config)
        if config.method == "protonet":
            return prototypical_network(learner.features, config.n_way)
        if config.method == "matchingnet":
            return matching_network(learner.features, config.n_way)
        if config.method in ("finetune", "nearest"):
            classes = _episodes(config.dataset, "train", config.n_way, config.k_shot, config.n_query).classes.tolist()
            return PretrainedClassifier(learner.features, learner.head.in_features, classes, config.n_way,
                                        evaluation=config.method, finetune_lr=config.inner_lr)  # fmt: skip
        if config.method == "metalstm":
            return MetaLSTM(learner, F.cross_entropy, steps=config.inner_steps, batch_size=config.support_batch, grad_clip=config.grad_clip)
        if config.loss_reduction == "per_shot":
            return _maml(config, learner, functools.partial(cross_entropy_per_shot, k_shot=config.k_shot))
        return _maml(config, learner, F.cross_entropy)
    in_features = 1 + TASK_INFO_FEATURES if config.method == "oracle" else 1
    model = mlp(in_features, config.hidden, 1)
    if config.init == "maml":
        maml_init_(model)
    if config.method == "oracle":
        return Oracle(model, F.mse_loss)
    if config.method == "pretrained":
        return Pretrained(model, F.mse_loss, finetune_lr=config.inner_lr)
    return _maml(config, model, F.mse_loss)


def cross_entropy_per_shot(logits: Tensor, labels: Tensor, k_shot: int) -> Tensor:
    """A task's cross-entropy summed over its examples and divided by K: the loss of the authors'
    MAML code (``xent`` in cbfinn/maml's utils.py, whose per-example values ``tf.gradients`` sums).
    On an N-way K-shot support set it is N x the mean, so the paper's step sizes (0.4 for 5-way,
    0.1 for 20-way) are N times larger steps on the mean loss."""
    return F.cross_entropy(logits, labels, reduction="sum") / k_shot


def _maml(config: Config, model: nn.Module, loss_fn) -> MAML:
    return MAML(
        model,
        loss_fn,
        inner_lr=config.inner_lr,
        inner_steps=config.inner_steps,
        first_order=config.first_order,
        learn_inner_lr=False if config.learn_inner_lr == "none" else config.learn_inner_lr,
        batched={"auto": "auto", "yes": True, "no": False}[config.batched],
        compile=config.compile,
        inner_params=model.inner_loop_parameters() if isinstance(model, Conv4) else None,
    )


def _conv_learner(config: Config) -> nn.Module:
    """The paper's learner: strided convolutions on Omniglot (28x28), max-pooling on miniImageNet (84x84);
    ``learner="authors"``: as in the authors' code."""
    authors = config.learner == "authors"
    if config.dataset == "omniglot":
        return Conv4(config.n_way, in_channels=1, hidden=config.channels, image_size=28, strided=True, authors=authors)
    return Conv4(config.n_way, in_channels=3, hidden=config.channels, image_size=84, authors=authors)


def metric_name(config: Config) -> str:
    return "mse" if config.dataset == "sinusoid" else "accuracy"


def training_batch(config: Config, generator: torch.Generator) -> TaskBatch:
    if config.dataset == "sinusoid":
        return sinusoid.SinusoidTasks(config.k_shot, config.n_query).sample(config.meta_batch, generator)
    return _episodes(config.dataset, "train", config.n_way, config.k_shot, config.n_query).sample(config.meta_batch, generator)


VALIDATION_SEED, TEST_SEED, EVAL_BATCH = 1, 2, 50  # episodes: seeds of the fixed val/test sets, episodes per batch


def validation_tasks(config: Config) -> list[TaskBatch]:
    if config.dataset == "sinusoid":
        return [sinusoid.with_shots(sinusoid.fixed_tasks("val", config.n_val_tasks), config.k_shot)]
    sampler = _episodes(config.dataset, "val", config.n_way, config.k_shot, config.eval_queries)
    return list(sampler.batches(sampler.fixed_episodes(config.n_val_tasks, VALIDATION_SEED), EVAL_BATCH))


def test_tasks(config: Config) -> TaskBatch:
    """The fixed sinusoid test tasks, with every support point (evaluation takes the first K of them): the
    same points whatever ``eval_shots`` a run has."""
    return sinusoid.fixed_tasks("test", config.n_test_tasks, max_shot=SINUSOID_VAL_SHOTS)


def test_episode_batches(config: Config):
    """The fixed meta-test episodes (saved in the cache folder, shared by every run), in batches."""
    sampler = _episodes(config.dataset, "test", config.n_way, config.k_shot, config.eval_queries)
    name = f"{config.dataset}-test-{config.n_way}w{config.k_shot}s{config.eval_queries}q-{config.n_test_tasks}-seed{TEST_SEED}.pt"
    episodes = sampler.fixed_episodes(config.n_test_tasks, TEST_SEED, path=cache_root() / "episodes" / name)
    return sampler.batches(episodes, EVAL_BATCH)


def check_episodes(config: Config, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """Load the config's dataset (DataError naming a missing file) and check that its episodes fit each of
    ``splits``: n_way classes, k_shot + n_query (meta-train) or k_shot + eval_queries (meta-val and meta-test)
    examples per class; a ConfigError naming the keys otherwise. The samplers are cached for the run."""
    if config.dataset == "sinusoid":
        return
    for split in splits:
        queries = "n_query" if split == "train" else "eval_queries"
        try:
            _episodes(config.dataset, split, config.n_way, config.k_shot, getattr(config, queries))
        except ValueError as e:
            raise ConfigError(f"n_way={config.n_way}, k_shot={config.k_shot}, {queries}={getattr(config, queries)} "
                              f"on the {config.dataset} {split} split: {str(e).replace('q_queries', queries)}") from None  # fmt: skip


@functools.lru_cache(maxsize=8)
def _episodes(dataset: str, split: str, n_way: int, k_shot: int, q_queries: int) -> EpisodeSampler:
    if dataset == "omniglot":
        from fewshot.tasks.omniglot import omniglot_tasks

        return omniglot_tasks(split, n_way, k_shot, q_queries)
    from fewshot.tasks.miniimagenet import load_miniimagenet, miniimagenet_splits

    return EpisodeSampler(load_miniimagenet(split), miniimagenet_splits()[split], n_way, k_shot, q_queries)


def per_task_mse(predictions: Tensor, targets: Tensor) -> Tensor:
    """(B, M, 1), (B, M, 1) -> (B,)."""
    return (predictions - targets).pow(2).flatten(1).mean(1)


def per_task_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, M, N), (B, M) -> (B,): the fraction of query examples classified right."""
    return (logits.argmax(-1) == labels).float().mean(1)


def scores_after_steps(method: nn.Module, config: Config, tasks: TaskBatch, steps: int) -> list[Tensor]:
    """Per step 0..``steps``, every task's query MSE or accuracy: a list of ``steps + 1`` tensors (B,).

    Classification queries are scored in class-balanced groups of ``config.query_group_size``
    (each group a forward pass of its own; see ``eval_query_batch``); a task's accuracy
    is the mean over its groups, which all have the same size.
    """
    if config.dataset == "sinusoid":
        return [per_task_mse(p, tasks.query_y) for p in method.adaptation_curve(tasks, steps)]
    groups = class_balanced_query_groups(tasks, config.n_way, config.query_group_size)
    if len(groups) > 1 and _adapts_once_for_query_batches(method):  # adapt once, then score group by group
        queries = TaskBatch(tasks.support_x, tasks.support_y, torch.cat([g.query_x for g in groups], 1),
                            torch.cat([g.query_y for g in groups], 1), tasks.info)  # fmt: skip
        curve = method.adaptation_curve(queries, steps, query_batch=config.query_group_size)
        return [per_task_accuracy(p, queries.query_y) for p in curve]
    per_group = [[per_task_accuracy(p, group.query_y) for p in method.adaptation_curve(group, steps)] for group in groups]
    return [torch.stack(step).mean(0) for step in zip(*per_group)]


def _adapts_once_for_query_batches(method: nn.Module) -> bool:
    """Whether ``method.adaptation_curve`` takes ``query_batch`` (MAML and fine-tuning do)."""
    return isinstance(method, MAML) or (isinstance(method, PretrainedClassifier) and method.evaluation == "finetune")


def validation_metric(method: nn.Module, config: Config, batches: list[TaskBatch], steps: int | None = None) -> float:
    """Mean query MSE or accuracy on the meta-validation tasks after ``steps`` (default ``inner_steps``) steps."""
    steps = config.inner_steps if steps is None else steps
    scores = [scores_after_steps(method, config, b, steps)[-1] for b in batches]
    return torch.cat(scores).mean().item()


def prepare_for_evaluation(method: nn.Module, config: Config) -> dict:
    """Anything a method settles on meta-validation data before meta-test; returns what it chose."""
    if not config.tune_inner_lr:
        return {}
    if isinstance(method, Pretrained):
        (val,) = validation_tasks(config)
        return {"finetune_lr": method.tune_step_size(val.to(device_of(method)), config.eval_steps)}
    if isinstance(method, PretrainedClassifier) and method.evaluation == "finetune":
        val = [b.to(device_of(method)) for b in validation_tasks(config)]
        return {"finetune_lr": method.tune_step_size(lambda: validation_metric(method, config, val, config.eval_steps))}
    return {}
