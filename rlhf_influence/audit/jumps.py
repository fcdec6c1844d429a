"""Reward jumps and the records that drove them.

A run's mean reward per round is r_1..r_K. Round k is a **jump** when the change
r_k - r_{k-1} exceeds ``z`` standard deviations of all round-to-round changes (default 1.5)
and ``min_delta`` (default 0). The policy that produced round k was trained on round k-1's
records, so a jump at round k is explained by round k-1's records: the top ones by influence
on that round's return target pushed the policy up, the bottom ones pushed it down.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import pairwise

from ..store import AttributionStore, StoreError


@dataclass(frozen=True)
class RoundSummary:
    round: int
    mean_reward: float
    kept: int
    dropped: int


@dataclass(frozen=True)
class RecordView:
    record: int
    prompt: str
    response: str
    reward: float
    influence: float
    kept: bool


@dataclass
class Jump:
    round: int  # the round whose rollouts showed the higher reward
    reward_delta: float
    attributed_round: int  # the round whose records trained the policy that produced it
    top_records: list[RecordView] = field(default_factory=list)
    bottom_records: list[RecordView] = field(default_factory=list)


@dataclass
class AuditReport:
    rounds: list[RoundSummary]
    jumps: list[Jump]
    rule: dict

    def to_json(self) -> dict:
        return {
            "rounds": [asdict(r) for r in self.rounds],
            "jumps": [asdict(j) for j in self.jumps],
            "rule": self.rule,
        }


def find_jumps(mean_rewards: list[float], z: float = 1.5, min_delta: float = 0.0) -> list[tuple[int, float]]:
    """(index, delta) of every position k >= 1 whose change from k-1 is a jump (see module doc)."""
    deltas = [b - a for a, b in pairwise(mean_rewards)]
    if not deltas:
        return []
    mean = sum(deltas) / len(deltas)
    std = math.sqrt(sum((d - mean) ** 2 for d in deltas) / len(deltas))
    threshold = max(min_delta, z * std)
    return [(k + 1, d) for k, d in enumerate(deltas) if d > threshold and d > 0]


def _records(store: AttributionStore, round_index: int) -> list[RecordView]:
    table = store.read_records(round_index).to_pydict()
    needed = ("record", "prompt", "response", "reward", "influence", "kept")
    missing = [c for c in needed if c not in table]
    if missing:
        raise StoreError(f"round {round_index}: records.parquet lacks columns {missing}")
    return [RecordView(*(table[c][i] for c in needed)) for i in range(len(table["record"]))]


def audit_run(path, z: float = 1.5, min_delta: float = 0.0, top: int = 5) -> AuditReport:
    """Summarise every round and attribute every reward jump of the run at ``path``."""
    store = AttributionStore.open(path)
    indices = store.rounds()
    if not indices:
        raise StoreError(f"{store.path} holds no complete round yet")
    summaries, records = [], {}
    for k in indices:
        rows = _records(store, k)
        records[k] = rows
        kept = sum(r.kept for r in rows)
        summaries.append(RoundSummary(k, sum(r.reward for r in rows) / len(rows), kept, len(rows) - kept))
    jumps = []
    for pos, delta in find_jumps([s.mean_reward for s in summaries], z=z, min_delta=min_delta):
        cause = indices[pos - 1]
        ranked = sorted((r for r in records[cause] if math.isfinite(r.influence)), key=lambda r: -r.influence)
        jumps.append(
            Jump(
                round=indices[pos],
                reward_delta=delta,
                attributed_round=cause,
                top_records=ranked[:top],
                bottom_records=ranked[::-1][:top],
            )
        )
    return AuditReport(summaries, jumps, {"z": z, "min_delta": min_delta, "top": top})
