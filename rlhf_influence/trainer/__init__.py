"""The IIF trainers: TRL's PPOTrainer, GRPOTrainer and RLOOTrainer with per-record influence scoring and filtering."""

from .config import IIFPPOConfig
from .grpo import IIFGRPOTrainer
from .grpo_config import IIFGRPOConfig
from .ppo import IIFPPOTrainer
from .rewards import RewardFunction
from .rloo import IIFRLOOTrainer
from .rloo_config import IIFRLOOConfig

__all__ = [
    "IIFGRPOConfig",
    "IIFGRPOTrainer",
    "IIFPPOConfig",
    "IIFPPOTrainer",
    "IIFRLOOConfig",
    "IIFRLOOTrainer",
    "RewardFunction",
]
