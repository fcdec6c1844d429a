"""rlhf-influence: local data attribution and influence-based filtering for RLHF with LoRA."""

from .engine.capture import RecordFactors, capture_factors
from .engine.errors import InfluenceError, LossShapeError, NoLoraError, NonFiniteError, UnsupportedLoraError
from .engine.gradients import per_record_gradients, target_gradients
from .engine.influence import influence_scores, scores_from_factors
from .engine.lora import LoraLayout, find_lora_layout
from .engine.projection import RandomProjector, SketchedProjector
from .engine.targets import LogProbTarget, ReturnTarget, encode_pairs, ppo_policy_loss, token_logprobs
from .iif.settings import IIFSettings

__version__ = "0.1.0"

_TRAINER_NAMES = ("IIFGRPOConfig", "IIFGRPOTrainer", "IIFPPOConfig", "IIFPPOTrainer", "IIFRLOOConfig",
                  "IIFRLOOTrainer", "RewardFunction")  # fmt: skip


def __getattr__(name: str):
    # The trainer imports TRL; the engine stays importable (and fast) without it.
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'rlhf_influence' has no attribute {name!r}")


__all__ = [  # noqa: RUF022 - engine names, then the trainer's
    "IIFSettings",
    "InfluenceError",
    "LogProbTarget",
    "LoraLayout",
    "LossShapeError",
    "NoLoraError",
    "NonFiniteError",
    "RandomProjector",
    "SketchedProjector",
    "RecordFactors",
    "ReturnTarget",
    "UnsupportedLoraError",
    "capture_factors",
    "encode_pairs",
    "find_lora_layout",
    "influence_scores",
    "per_record_gradients",
    "ppo_policy_loss",
    "scores_from_factors",
    "target_gradients",
    "token_logprobs",
    "IIFGRPOConfig",
    "IIFGRPOTrainer",
    "IIFPPOConfig",
    "IIFPPOTrainer",
    "IIFRLOOConfig",
    "IIFRLOOTrainer",
    "RewardFunction",
]
