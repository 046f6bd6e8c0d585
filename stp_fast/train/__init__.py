"""Training and search: STP and ST (``STPTrainer``, ``STPConfig``), IEE and its baselines
(``IEEConfig``; ``STPTrainer(..., IEEConfig(...))`` runs an ``IEETrainer``), losses, the arch pool,
checkpoints (atomic, ``weights_only`` loading)."""

from stp_fast.train.checkpoint import CheckpointError
from stp_fast.train.config import STPConfig
from stp_fast.train.iee import IEEConfig, IEEResult, IEETrainer
from stp_fast.train.pool import ArchPool
from stp_fast.train.trainer import STPResult, STPTrainer, TrainingDiverged

__all__ = ["ArchPool", "CheckpointError", "IEEConfig", "IEEResult", "IEETrainer", "STPConfig", "STPResult",
           "STPTrainer", "TrainingDiverged"]
