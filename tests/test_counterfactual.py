"""Counterfactual re-runs from the run's own optimizer state (issue: influence worth following)."""

from __future__ import annotations

import pytest
import torch
from trainer_setup import Setup, ppo_kwargs, seed_everything

from rlhf_influence import IIFPPOConfig, IIFPPOTrainer


def train(out, rounds: int, **overrides):
    setup = Setup()
    settings = dict(
        per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=8 * rounds, iif_drop_fraction=0.0, iif_store_optimizer_state=True,
        lr_scheduler_type="constant",
    )  # fmt: skip
    kwargs = ppo_kwargs(out, **{**settings, **overrides})
    trainer = IIFPPOTrainer(
        args=IIFPPOConfig(**kwargs), processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
        reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value, target_dataset=setup.heldout,
    )  # fmt: skip
    seed_everything(0)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moments-run")
    train(out, rounds=3)
    return out


def test_stored_moments_are_the_optimizers_own(stored_run, tmp_path):
    """Round 2's stored Adam state equals the optimizer's state after a 1-round run from the same seed;
    round 1's is Adam before its first step."""
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(stored_run)
    assert store.manifest.optimizer_state
    first = store.read_tensors(1, "optimizer")
    assert float(first["step"][0]) == 0.0
    assert all(not t.any() for k, t in first.items() if k.startswith("exp_avg"))
    lr, beta1, beta2, eps, weight_decay = first["hyperparameters"].tolist()
    assert (lr, beta1, beta2, eps, weight_decay) == pytest.approx((3e-3, 0.9, 0.999, 1e-8, 0.0))

    one_round = train(tmp_path, rounds=1)
    optimizer = one_round.optimizer.optimizer
    second = store.read_tensors(2, "optimizer")
    assert float(second["step"][0]) == 1.0  # one mini-batch, one epoch: one step a round
    names = 0
    for name, param in one_round.unwrapped.policy.named_parameters():
        if "lora_" not in name:
            continue
        state = optimizer.state[param]
        assert torch.equal(second[f"exp_avg/{name}"], state["exp_avg"]), name
        assert torch.equal(second[f"exp_avg_sq/{name}"], state["exp_avg_sq"]), name
        names += 1
    assert names == len([k for k in second if k.startswith("exp_avg/")]) > 0


def test_a_rerun_from_the_stored_moments_reproduces_the_run(stored_run):
    """With one step a round, re-running round 2 on all its records from the stored moments lands
    on round 3's stored snapshot; from fresh moments it does not (Adam's first step is sign-like)."""
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    scorer = SnapshotScorer(stored_run)
    replay = RoundReplay(scorer, 2)
    assert replay.has_optimizer_state
    everyone = torch.arange(len(replay)).numpy()
    expected = scorer.store.read_tensors(3, "adapter")
    params = dict(scorer.policy.named_parameters())

    def distance() -> float:
        return max(float((params[k].detach() - v).abs().max() / v.abs().max()) for k, v in expected.items())

    replay.rerun(everyone, seed=0)  # the stored moments, by default
    assert distance() < 1e-5
    replay.rerun(everyone, seed=0, moments="fresh")
    assert distance() > 1e-3


def test_optimizer_state_is_refused_where_it_cannot_be_had(stored_run, tmp_path):
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer
    from rlhf_influence.store import StoreError

    replay = RoundReplay(SnapshotScorer(stored_run), 2)
    with pytest.raises(ValueError, match="'stored' or 'fresh'"):
        replay.optimizer("old")
    plain = tmp_path / "plain"
    train(plain, rounds=1, iif_store_optimizer_state=False)
    replay = RoundReplay(SnapshotScorer(plain), 1)
    assert not replay.has_optimizer_state
    with pytest.raises(StoreError, match="--iif_store_optimizer_state true"):
        replay.optimizer("stored")
