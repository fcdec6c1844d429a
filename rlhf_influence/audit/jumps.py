"""Reward jumps and the records that drove them.

A run's mean reward per round is r_1..r_K. Round k is a **jump** when the change
r_k - r_{k-1} exceeds ``z`` standard deviations of all round-to-round changes (default 1.5)
and ``min_delta`` (default 0). The policy that produced round k was trained on round k-1's
records, so a jump at round k is explained by round k-1's records: the top ones by influence
on that round's return target pushed the policy up, the bottom ones pushed it down.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise

from ..store import AttributionStore, StoreError


@dataclass(frozen=True)
class RoundSummary:
    round: int
    mean_reward: float
    kept: int
    dropped: int
    kl: float | None = None  # the policy's KL to the reference per response (see round_kl), where logged
    kl_coef: float | None = None  # the KL penalty's coefficient the round used, where logged


@dataclass(frozen=True)
class RecordView:
    record: int
    prompt: str
    response: str
    reward: float
    influence: float
    kept: bool
    advantage_mean: float = math.nan  # over the response's tokens
    advantage_last: float = math.nan  # at its last token


@dataclass
class JumpResponses:
    """Which records of the round before a jump made the jump round's best responses more likely.

    The target is the summed log-probability of ``responses`` (the jump round's highest-reward
    records) at the previous round's stored snapshot; ``records`` are that round's records with
    the highest influence on it (``influence`` holds that score, not the return target's).
    ``kept_of_top``: the share of ``records`` IIF kept; ``kept_of_raising``: the share kept among
    all records with positive influence on it. ``note`` says why it is missing, when it is.
    """

    responses: list[RecordView] = field(default_factory=list)
    records: list[RecordView] = field(default_factory=list)
    kept_of_top: float | None = None
    kept_of_raising: float | None = None
    note: str = ""

    def kept_text(self) -> str:
        """'IIF kept 40% of these, and 38% of all records that raised it' (or '-' where undefined)."""
        top = "-" if self.kept_of_top is None else f"{self.kept_of_top:.0%}"
        raising = "-" if self.kept_of_raising is None else f"{self.kept_of_raising:.0%}"
        return f"IIF kept {top} of these, and {raising} of all records that raised it"


@dataclass
class Jump:
    round: int  # the round whose rollouts showed the higher reward
    reward_delta: float
    attributed_round: int  # the round whose records trained the policy that produced it
    top_records: list[RecordView] = field(default_factory=list)
    bottom_records: list[RecordView] = field(default_factory=list)
    best_responses: JumpResponses | None = None


@dataclass
class AuditReport:
    rounds: list[RoundSummary]
    jumps: list[Jump]
    rule: dict
    score: str = "raw"  # the run's influence score: "raw", "adam", or "none" (a record-only run)
    record_loss: str = "policy"  # what the scores differentiate: "policy", or "policy_and_value" (PPO's shared head)

    def to_json(self) -> dict:
        """Plain JSON values: NaN and infinities (a missing advantage column, a non-finite score) as None."""
        return finite_or_none(
            {
                "rounds": [asdict(r) for r in self.rounds],
                "jumps": [asdict(j) for j in self.jumps],
                "rule": self.rule,
                "score": self.score,
                "record_loss": self.record_loss,
            }
        )


def finite_or_none(value):
    """``value`` with every NaN or infinity, however deep in dicts and lists, made None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def find_jumps(mean_rewards: list[float], z: float = 1.5, min_delta: float = 0.0) -> list[tuple[int, float]]:
    """(index, delta) of every position k >= 1 whose change from k-1 is a jump (see module doc)."""
    deltas = [b - a for a, b in pairwise(mean_rewards)]
    finite = [d for d in deltas if math.isfinite(d)]
    if not finite:
        return []
    mean = sum(finite) / len(finite)  # a round with a non-finite mean reward is no jump, nor sets the scale
    std = math.sqrt(sum((d - mean) ** 2 for d in finite) / len(finite))
    threshold = max(min_delta, z * std)
    return [(k + 1, d) for k, d in enumerate(deltas) if math.isfinite(d) and d > threshold and d > 0]


COLUMNS = ("record", "prompt", "response", "reward", "influence", "kept")
ADVANTAGE_COLUMNS = ("advantage_mean", "advantage_last")  # absent from stores of other writers


def _records(store: AttributionStore, round_index: int) -> list[RecordView]:
    table = store.read_records(round_index).to_pydict()
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise StoreError(f"round {round_index}: records.parquet lacks columns {missing}")
    present = COLUMNS + tuple(c for c in ADVANTAGE_COLUMNS if c in table)
    return [RecordView(**{c: table[c][i] for c in present}) for i in range(len(table["record"]))]


# The round's KL to the reference per response, in order of preference: PPO's exact KL over the
# vocabulary (never negative); GRPO's objective/kl (its non-negative estimator exp(r) - r - 1); the
# sampled log-ratio an older PPO store logged (can be negative).
KL_METRICS = ("objective/kl_exact", "objective/kl")


def _finite(value) -> float | None:
    """A logged metric as a float; None where it is missing or not a finite number."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def round_kl(metrics: dict) -> float | None:
    """A round's KL to the reference from its metrics (the first of :data:`KL_METRICS` logged)."""
    return next((v for key in KL_METRICS if (v := _finite(metrics.get(key))) is not None), None)


def _kl(store: AttributionStore, round_index: int) -> tuple[float | None, float | None]:
    """The round's KL to the reference and KL coefficient; None where its metrics lack them or
    cannot be read (the audit needs only the records)."""
    try:
        metrics = store.read_metrics(round_index)
    except StoreError:
        return None, None
    return round_kl(metrics), _finite(metrics.get("objective/kl_coef"))


def audit_run(path, z: float = 1.5, min_delta: float = 0.0, top: int = 5, responses: int = 0) -> AuditReport:
    """Summarise every round and attribute every reward jump of the run at ``path``.

    ``responses`` > 0: also trace, for each jump, the jump round's ``responses`` highest-reward
    responses to the records of the round before that made them more likely (from the stored
    gradients; this rebuilds the policy once).
    """
    store = AttributionStore.open(path)
    indices = store.rounds()
    if not indices:
        raise StoreError(f"{store.path} holds no complete round yet")
    summaries, records = [], {}
    for k in indices:
        rows = _records(store, k)
        records[k] = rows
        kept = sum(r.kept for r in rows)
        summaries.append(
            RoundSummary(k, sum(r.reward for r in rows) / len(rows), kept, len(rows) - kept, *_kl(store, k))
        )
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
    if responses > 0 and jumps:
        _trace_best_responses(path, jumps, records, responses, top)
    rule = {"z": z, "min_delta": min_delta, "top": top, "responses": responses}
    score = "none" if store.manifest.target == "none" else store.manifest.score
    training = store.manifest.training
    record_loss = (training.record_loss if training is not None else None) or "policy"
    return AuditReport(summaries, jumps, rule, score=score, record_loss=record_loss)


def _trace_best_responses(path, jumps: list[Jump], records: dict, responses: int, top: int) -> None:
    """Fill each jump's ``best_responses`` (see :class:`JumpResponses`)."""
    from .rescore import SnapshotScorer

    try:
        scorer = SnapshotScorer(path)
    except StoreError as exc:
        for jump in jumps:
            jump.best_responses = JumpResponses(note=f"not available: {exc}")
        return
    for jump in jumps:
        # an empty response has no tokens whose probability could be raised
        candidates = [r for r in records[jump.round] if r.response.strip() and math.isfinite(r.reward)]
        best = sorted(candidates, key=lambda r: -r.reward)[:responses]
        if not best:
            jump.best_responses = JumpResponses(note=f"round {jump.round} has no non-empty response")
            continue
        try:
            scored = scorer.score_pairs(
                jump.attributed_round, [r.prompt for r in best], [r.response for r in best]
            )
        except StoreError as exc:
            jump.best_responses = JumpResponses(responses=best, note=f"not available: {exc}")
            continue
        by_record = {s.record: s.influence for s in scored}
        rescored = [
            replace(r, influence=by_record[r.record])
            for r in records[jump.attributed_round]
            if math.isfinite(by_record.get(r.record, math.nan))
        ]
        ranked = sorted(rescored, key=lambda r: -r.influence)[:top]
        raising = [r for r in rescored if r.influence > 0]
        jump.best_responses = JumpResponses(
            responses=best,
            records=ranked,
            kept_of_top=sum(r.kept for r in ranked) / len(ranked) if ranked else None,
            kept_of_raising=sum(r.kept for r in raising) / len(raising) if raising else None,
        )
