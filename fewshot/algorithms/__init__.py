"""Meta-learning algorithms, one file each, and the baselines they are compared with."""

from fewshot.algorithms.maml import MAML, TaskBatch, adapt
from fewshot.algorithms.meta_lstm import MetaLSTM
from fewshot.algorithms.oracle import Oracle
from fewshot.algorithms.pretrained import Pretrained

__all__ = ["MAML", "MetaLSTM", "Oracle", "Pretrained", "TaskBatch", "adapt"]
