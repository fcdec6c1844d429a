"""The paper's analyses on a stored run: diagnosis of harmful records, behaviour formation.

diagnose: the paper finds that the records with the most negative influence are mostly those
whose advantage estimate has the wrong sign. The true advantage is unknown, so the check here
uses the record's reward relative to its round's mean reward as the reference: a record's
advantage estimate (mean over its response tokens) has the **wrong sign** when its sign
differs from that of (reward - round mean reward). The share of wrong signs among the bottom
records is compared with the share among the top records and among all records.

formation: how the records that make a chosen behaviour (log pi(response | prompt)) more
likely change across rounds, scored from each round's stored gradients at its snapshot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..store import AttributionStore, StoreError
from .rescore import BeforeAdamStepError, ScoredRecord, SnapshotScorer


@dataclass
class DiagnoseRound:
    round: int
    records: int
    bottom_wrong_sign: float
    top_wrong_sign: float
    all_wrong_sign: float


def _wrong_sign(rows: list[tuple[float, float]]) -> tuple[int, int]:
    """(wrong, counted) over (advantage, centred reward) pairs; zeros have no sign and are skipped."""
    counted = [(a, r) for a, r in rows if a != 0 and r != 0]
    return sum((a > 0) != (r > 0) for a, r in counted), len(counted)


def diagnose(path, bottom_fraction: float = 0.1) -> dict:
    """Share of wrong-sign advantages among the bottom / top ``bottom_fraction`` records by influence."""
    if not 0 < bottom_fraction <= 0.5:
        raise StoreError(f"--bottom-fraction must be in (0, 0.5], got {bottom_fraction}")
    store = AttributionStore.open(path)
    per_round, pooled = [], {"bottom": [0, 0], "top": [0, 0], "all": [0, 0]}
    for k in store.rounds():
        t = store.read_records(k).to_pydict()
        if "advantage_mean" not in t:
            raise StoreError(f"round {k}: records.parquet lacks the advantage_mean column")
        mean_reward = sum(t["reward"]) / len(t["reward"])
        rows = sorted(
            (inf, adv, rew - mean_reward)
            for inf, adv, rew in zip(t["influence"], t["advantage_mean"], t["reward"], strict=True)
            if math.isfinite(inf)
        )
        count = max(1, math.ceil(bottom_fraction * len(rows)))
        groups = {"bottom": rows[:count], "top": rows[-count:], "all": rows}
        shares = {}
        for name, group in groups.items():
            wrong, counted = _wrong_sign([(a, r) for _, a, r in group])
            pooled[name][0] += wrong
            pooled[name][1] += counted
            shares[name] = wrong / counted if counted else float("nan")
        per_round.append(DiagnoseRound(k, len(rows), shares["bottom"], shares["top"], shares["all"]))
    overall = {f"{name}_wrong_sign": (w / c if c else float("nan")) for name, (w, c) in pooled.items()}
    return {
        "rule": {
            "bottom_fraction": bottom_fraction,
            "wrong_sign": "sign(advantage_mean) != sign(reward - round mean)",
        },
        "rounds": [asdict(r) for r in per_round],
        "overall": overall,
    }


@dataclass
class FormationRound:
    round: int
    positive_fraction: float  # records whose update made the behaviour more likely
    total_influence: float
    top_records: list[ScoredRecord] = field(default_factory=list)


def formation(
    path, prompt: str, response: str, top: int = 5, rounds: list[int] | None = None, adam: bool = False
) -> dict:
    """Per round: the records that pushed the model toward saying ``response`` to ``prompt``.
    ``adam``: Adam-aware scores; the rounds before Adam's first step have none and are listed as
    ``rounds_before_adam`` (only when they were not asked for by name: then they are an error)."""
    scorer = SnapshotScorer(path)
    out, before_adam = [], []
    for k in rounds or scorer.rounds:
        try:
            scored = scorer.score(k, prompt, response, adam=adam)
        except BeforeAdamStepError:
            if rounds:  # asked for by name
                raise
            before_adam.append(k)
            continue
        ranked = sorted(scored, key=lambda r: -r.influence)
        positive = sum(r.influence > 0 for r in scored) / len(scored)
        out.append(FormationRound(k, positive, sum(r.influence for r in scored), ranked[:top]))
    result = {"prompt": prompt, "response": response, "adam": adam, "rounds": [asdict(r) for r in out]}
    if adam:
        result["rounds_before_adam"] = before_adam
    return result
