"""Learner networks."""

from fewshot.models.conv import Conv4
from fewshot.models.mlp import maml_init_, mlp

__all__ = ["Conv4", "maml_init_", "mlp"]
