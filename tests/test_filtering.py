"""The IIF drop rule and the epoch plan, against direct definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf_influence.iif.filtering import iif_keep_mask, plan_epoch


def reference_keep(scores: list[float], p: float, min_keep: float) -> list[bool]:
    """The paper's rule written out: drop floor(p * N-) most negative, keep >= ceil(min_keep * N)."""
    n = len(scores)
    negatives = sorted((s, i) for i, s in enumerate(scores) if math.isfinite(s) and s < 0)
    drop = min(math.floor(p * len(negatives)), n - math.ceil(min_keep * n))
    dropped = {i for _, i in negatives[: max(drop, 0)]}
    return [i not in dropped for i in range(n)]


@pytest.mark.parametrize("p", [0.0, 0.0625, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(5))
def test_keep_mask_matches_the_rule(p, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(37, generator=g)
    decision = iif_keep_mask(scores, p, min_keep_fraction=0.1)
    assert decision.keep.tolist() == reference_keep(scores.tolist(), p, 0.1)
    assert decision.num_negative == int((scores < 0).sum())
    assert decision.num_dropped == math.floor(p * decision.num_negative)


def test_minimum_kept_fraction_binds_when_all_are_negative():
    decision = iif_keep_mask(-torch.arange(1, 11, dtype=torch.float), 1.0, min_keep_fraction=0.3)
    assert decision.keep.tolist() == [True] * 3 + [False] * 7  # the three least negative stay


def test_non_finite_scores_are_kept_and_counted():
    scores = torch.tensor([float("nan"), -1.0, float("-inf"), 2.0, -3.0])
    decision = iif_keep_mask(scores, 1.0, min_keep_fraction=0.1)
    assert decision.num_nonfinite == 2
    assert decision.keep.tolist() == [True, False, True, True, False]


def trl_split(order: np.ndarray, local_batch: int, local_mini: int, per_device: int) -> list[list[list[int]]]:
    """PPOTrainer's own slicing of a shuffled batch into mini- and micro-batches."""
    return [
        [order[m : m + local_mini][s : s + per_device].tolist() for s in range(0, local_mini, per_device)]
        for m in range(0, local_batch, local_mini)
    ]


@pytest.mark.parametrize(
    "per_device, accumulation, num_mini",
    [(4, 2, 2), (4, 1, 1), (4, 1, 2), (2, 4, 2), (8, 2, 4), (4, 3, 2), (2, 3, 2)],
)
def test_plan_without_filtering_is_ppo_split(per_device, accumulation, num_mini):
    local_batch = per_device * accumulation
    local_mini = local_batch // num_mini
    order = np.random.default_rng(0).permutation(local_batch)
    plan = plan_epoch(
        order, local_batch, local_mini_batch_size=local_mini, per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation, num_mini_batches=num_mini,
    )  # fmt: skip
    assert [[m.tolist() for m in mini] for mini in plan] == trl_split(
        order, local_batch, local_mini, per_device
    )


@pytest.mark.parametrize(
    "per_device, accumulation, num_mini", [(4, 2, 2), (4, 1, 2), (2, 4, 2), (8, 2, 4), (4, 4, 1)]
)
def test_plan_with_filtering_is_equal_across_processes_and_aligned(per_device, accumulation, num_mini):
    local_batch = per_device * accumulation
    local_mini = local_batch // num_mini
    rng = np.random.default_rng(1)
    for _ in range(20):
        kept = [
            rng.choice(local_batch, size=int(rng.integers(0, local_batch + 1)), replace=False)
            for _ in range(3)
        ]
        max_kept = max(len(k) for k in kept)
        plans = [
            plan_epoch(
                k,
                max_kept,
                local_mini_batch_size=local_mini,
                per_device_batch_size=per_device,
                gradient_accumulation_steps=accumulation,
                num_mini_batches=num_mini,
            )
            for k in kept
        ]
        shapes = {tuple(len(mini) for mini in plan) for plan in plans}
        assert len(shapes) == 1  # same mini-batches and micro-batches on every process
        micro_total = sum(next(iter(shapes)))
        assert micro_total % accumulation == 0  # no half-accumulated gradient crosses an epoch
        assert micro_total <= local_batch // min(per_device, local_mini)  # never more work than PPO
        for plan, k in zip(plans, kept, strict=True):
            flat = [i for mini in plan for micro in mini for i in micro.tolist()]
            assert sorted(flat) == sorted(k.tolist())  # every kept record exactly once
            assert all(len(micro) <= per_device for mini in plan for micro in mini)


def test_random_control_drops_as_many_records_at_random():
    from rlhf_influence.iif.filtering import random_keep_mask

    scores = torch.randn(50, generator=torch.Generator().manual_seed(3))
    decision = iif_keep_mask(scores, 0.5, 0.1)
    picks = [random_keep_mask(decision, torch.Generator().manual_seed(s)).keep for s in range(200)]
    assert all(int((~k).sum()) == decision.num_dropped for k in picks)
    assert torch.equal(picks[0], random_keep_mask(decision, torch.Generator().manual_seed(0)).keep)
    # Uniform: every record is dropped at about the same rate (num_dropped / 50).
    rate = torch.stack([~k for k in picks]).float().mean(0)
    assert abs(float(rate.mean()) - decision.num_dropped / 50) < 1e-6
    assert float(rate.max() - rate.min()) < 0.35
    # Not the influence rule: the harmful records are not singled out.
    assert float(rate[~decision.keep].mean()) < 0.8


@pytest.mark.parametrize(
    "per_device, accumulation, num_mini", [(4, 2, 2), (4, 1, 2), (2, 4, 2), (8, 2, 4), (4, 4, 1), (1, 8, 8)]
)
def test_keep_steps_plan_has_ppos_steps_with_smaller_mini_batches(per_device, accumulation, num_mini):
    """iif_keep_steps: PPO's number of mini-batches and micro-batches whatever is kept; the kept
    records spread evenly over them; with nothing dropped, exactly PPO's split."""
    local_batch = per_device * accumulation
    local_mini = local_batch // num_mini
    options = dict(local_mini_batch_size=local_mini, per_device_batch_size=per_device,
                   gradient_accumulation_steps=accumulation, num_mini_batches=num_mini, keep_steps=True)  # fmt: skip
    order = np.random.default_rng(0).permutation(local_batch)
    full = plan_epoch(order, local_batch, **options)
    assert [[m.tolist() for m in mini] for mini in full] == trl_split(
        order, local_batch, local_mini, per_device
    )
    ppo_shape = tuple(len(mini) for mini in full)
    rng = np.random.default_rng(2)
    for _ in range(20):
        kept = [
            rng.choice(local_batch, size=int(rng.integers(0, local_batch + 1)), replace=False)
            for _ in range(3)
        ]
        max_kept = max(len(k) for k in kept)
        plans = [plan_epoch(k, max_kept, **options) for k in kept]
        shapes = {tuple(len(mini) for mini in plan) for plan in plans}
        assert len(shapes) == 1  # the same steps on every process
        if max_kept >= num_mini:
            assert next(iter(shapes)) == ppo_shape  # PPO's steps, each smaller
        for plan, k in zip(plans, kept, strict=True):
            flat = [i for mini in plan for micro in mini for i in micro.tolist()]
            assert sorted(flat) == sorted(k.tolist())
            sizes = [sum(len(micro) for micro in mini) for mini in plan]
            assert max(sizes) - min(sizes) <= 1  # evenly filled
            if len(k) == max_kept > 0 and min(sizes) == 0:
                # an empty mini-batch only where gradient accumulation needs the count aligned (and then
                # it is part of an accumulated step, never a step of its own)
                assert (max_kept * -(-local_mini // per_device)) % accumulation != 0
