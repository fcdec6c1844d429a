"""What a round's records are scored against (``iif_target``): each kind once, found by name.

Settings, recipes, trainers, the scorer and the replay ask a kind what it is rather than compare
its name. Adding a kind is its entry here and how the scorer builds it (:class:`RecordScorer`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetKind:
    """A return target's kind: what it is built from and what it allows."""

    name: str
    summary: str
    scores: bool  # records are scored against it (False: record only, nothing scored or dropped)
    needs_heldout: bool  # fresh samples of held-out prompts each round (a target_dataset)
    per_token_advantages: bool  # weighted by each token's advantage (the buffer form), else each response's
    # at the round start its gradient is the records' own, summed: one pass scores them (where the loss allows)
    round_start_shortcut: bool


TARGET_KINDS: dict[str, TargetKind] = {
    kind.name: kind
    for kind in (
        TargetKind("heldout_return", "fresh responses to held-out prompts, each weighted by its advantage",
                   scores=True, needs_heldout=True, per_token_advantages=False, round_start_shortcut=False),
        TargetKind("buffer_return", "the round's own records, each token weighted by its advantage",
                   scores=True, needs_heldout=False, per_token_advantages=True, round_start_shortcut=True),
        TargetKind("none", "no target: record the store's gradients only",
                   scores=False, needs_heldout=False, per_token_advantages=False, round_start_shortcut=False),
    )
}  # fmt: skip


def target_kind(name: str) -> TargetKind:
    """The target kind ``name`` (ValueError naming the known ones)."""
    try:
        return TARGET_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown iif_target {name!r}; known: {', '.join(TARGET_KINDS)}") from None
