"""The policy's KL to the reference: a sound estimate of it, and the adaptive coefficient that holds it.

``exact_kl`` is KL(policy || reference) at each sampled position, summed over the vocabulary from
both models' logits (never negative, no sampling noise within a position); a response's KL is
its sum over the response's tokens. TRL's PPO logs the sampled log-ratio instead (``k1``: its
mean is the KL, but a round's value can be negative).

``KLController`` is the coefficient of the KL penalty (PPO's ``kl_coef``, GRPO's ``beta``):
fixed, or adaptive as in Ziegler et al. 2019 and the paper's code (TRL 0.5's
``AdaptiveKLController``): after each round,

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)

with KL the round's mean response KL and n the records of the round (all processes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

KL_CONTROLS = ("fixed", "adaptive")


def exact_kl(logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n] each response's KL(policy || reference): per position the exact KL over the vocabulary
    from the two models' logits [n, T, V] (temperature applied alike), summed over the positions
    where ``mask`` [n, T] is true. Computed in float32 at least."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    logq = torch.log_softmax(reference_logits.to(dtype), dim=-1)
    per_position = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)  # >= 0 up to rounding
    return (per_position * mask.to(dtype)).sum(-1)


@dataclass
class KLController:
    """The KL coefficient of a run: fixed (``target`` None) or adaptive toward ``target``."""

    value: float
    target: float | None = None
    horizon: int = 10_000

    @classmethod
    def from_settings(cls, initial: float, control: str, target: float | None, horizon: int) -> KLController:
        if control not in KL_CONTROLS:
            raise ValueError(f"kl_control must be one of {KL_CONTROLS}, got {control!r}")
        return cls(initial, target if control == "adaptive" else None, horizon)

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, kl: float, records: int) -> float:
        """The coefficient after a round whose mean response KL was ``kl`` over ``records`` records."""
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * records / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
