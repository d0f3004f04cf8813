"""Learner networks."""

from fewshot.models.mlp import mlp

__all__ = ["mlp"]
