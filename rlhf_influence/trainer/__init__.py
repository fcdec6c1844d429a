"""The IIF trainers: TRL's PPOTrainer and GRPOTrainer with per-record influence scoring and filtering."""

from .config import IIFPPOConfig
from .grpo import IIFGRPOTrainer
from .grpo_config import IIFGRPOConfig
from .rewards import RewardFunction
from .trainer import IIFPPOTrainer

__all__ = ["IIFGRPOConfig", "IIFGRPOTrainer", "IIFPPOConfig", "IIFPPOTrainer", "RewardFunction"]
