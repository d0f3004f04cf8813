"""From a Config to the objects a run needs: the method, its task stream, its validation metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.algorithms import MAML, Oracle, Pretrained, TaskBatch
from fewshot.config import Config
from fewshot.models import maml_init_, mlp
from fewshot.tasks import sinusoid

TASK_INFO_FEATURES = 2  # a sinusoid's (amplitude, phase), given to the oracle only


def build_method(config: Config) -> nn.Module:
    """The learner for ``config``, initialised from ``config.seed``."""
    torch.manual_seed(config.seed)
    in_features = 1 + TASK_INFO_FEATURES if config.method == "oracle" else 1
    model = mlp(in_features, config.hidden, 1)
    if config.init == "maml":
        maml_init_(model)
    if config.method == "oracle":
        return Oracle(model, F.mse_loss)
    if config.method == "pretrained":
        return Pretrained(model, F.mse_loss, finetune_lr=config.inner_lr)
    return MAML(
        model,
        F.mse_loss,
        inner_lr=config.inner_lr,
        inner_steps=config.inner_steps,
        first_order=config.first_order,
        learn_inner_lr=False if config.learn_inner_lr == "none" else config.learn_inner_lr,
        batched={"auto": "auto", "yes": True, "no": False}[config.batched],
        compile=config.compile,
    )


def training_batch(config: Config, generator: torch.Generator) -> TaskBatch:
    return sinusoid.SinusoidTasks(config.k_shot, config.n_query).sample(config.meta_batch, generator)


def validation_tasks(config: Config) -> TaskBatch:
    return sinusoid.with_shots(sinusoid.fixed_tasks("val", config.n_val_tasks), config.k_shot)


def test_tasks(config: Config) -> TaskBatch:
    return sinusoid.fixed_tasks("test", config.n_test_tasks, max_shot=max(config.eval_shots))


def per_task_mse(predictions: Tensor, targets: Tensor) -> Tensor:
    """(B, M, 1), (B, M, 1) -> (B,)."""
    return (predictions - targets).pow(2).flatten(1).mean(1)


def validation_mse(method: nn.Module, config: Config, tasks: TaskBatch) -> float:
    """Mean query MSE on the meta-validation tasks after ``inner_steps`` steps."""
    predictions = method.adaptation_curve(tasks, config.inner_steps)[-1]
    return per_task_mse(predictions, tasks.query_y).mean().item()


def prepare_for_evaluation(method: nn.Module, config: Config) -> dict:
    """Anything a method settles on meta-validation data before meta-test; returns what it chose."""
    if isinstance(method, Pretrained) and config.tune_inner_lr:
        val = sinusoid.with_shots(sinusoid.fixed_tasks("val", config.n_val_tasks), config.k_shot)
        return {"finetune_lr": method.tune_step_size(val, config.eval_steps)}
    return {}
