"""Learner networks."""

from fewshot.models.mlp import maml_init_, mlp

__all__ = ["maml_init_", "mlp"]
