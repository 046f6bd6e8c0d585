"""Training and search: STP and ST (``STPTrainer``, ``STPConfig``), losses, the arch pool,
checkpoints (atomic, ``weights_only`` loading)."""

from stp_fast.train.checkpoint import CheckpointError
from stp_fast.train.config import STPConfig
from stp_fast.train.pool import ArchPool
from stp_fast.train.trainer import STPResult, STPTrainer, TrainingDiverged

__all__ = ["ArchPool", "CheckpointError", "STPConfig", "STPResult", "STPTrainer", "TrainingDiverged"]
