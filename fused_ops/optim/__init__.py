"""The fused optimizers: one machinery (``_base.FusedOptimizer``), one small file per optimizer."""

from ._base import MASTER_KEY, FusedOptimizer
from .adam import FusedAdam, FusedAdamW
from .lion import FusedLion
from .sgd import FusedSGD

__all__ = ["MASTER_KEY", "FusedAdam", "FusedAdamW", "FusedLion", "FusedOptimizer", "FusedSGD"]
