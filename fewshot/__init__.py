"""fewshot: meta-learning on PyTorch, functional and fast."""

from fewshot.algorithms import MAML, TaskBatch, adapt

__version__ = "0.1.0"
__all__ = ["MAML", "TaskBatch", "adapt", "__version__"]
