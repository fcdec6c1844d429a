"""The IIF trainer: TRL's PPOTrainer with per-record influence scoring and filtering."""

from .config import IIFPPOConfig
from .rewards import RewardFunction
from .trainer import IIFPPOTrainer

__all__ = ["IIFPPOConfig", "IIFPPOTrainer", "RewardFunction"]
