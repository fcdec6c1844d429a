"""Counterfactual re-runs from the run's own optimizer state (issue: influence worth following)."""

from __future__ import annotations

import pytest
import torch
from trainer_setup import train_ppo


def train(out, rounds: int, **overrides):
    settings = dict(
        per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=8 * rounds, iif_drop_fraction=0.0, iif_store_optimizer_state=True,
        lr_scheduler_type="constant",
    )  # fmt: skip
    return train_ppo(out, **{**settings, **overrides})


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


def brute_force_adam_scores(run_dir, round_index: int) -> tuple[torch.Tensor, bool]:
    """Reference for a stored round's scores: per-record gradients of the trainer's record loss by
    one autograd call each, at the stored snapshot, divided by sqrt(v_hat) + eps computed here
    from the stored Adam state, dotted with the autograd gradient of the round's return target."""
    from conftest import brute_force_per_record

    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    scorer = SnapshotScorer(run_dir)
    replay = RoundReplay(scorer, round_index)
    scorer.load_round(round_index)
    policy, records = scorer.policy, replay.records
    normaliser = replay.record_scorer.normaliser(records)
    per_record = brute_force_per_record(policy, lambda model: replay.record_scorer.loss(model, records, normaliser))
    params = [p for p in policy.parameters() if p.requires_grad]
    target = torch.cat([g.flatten() for g in torch.autograd.grad(replay.return_target()(policy).sum(), params)])
    state = replay.optimizer_state()
    step = float(state["step"][0])
    if step == 0:  # before the first step: raw scores
        return -(per_record @ target), False
    _, _, beta2, eps, _ = state["hyperparameters"].tolist()
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    v = torch.cat([state[f"exp_avg_sq/{n}"].flatten() for n in names])
    adam_step = per_record / ((v / (1 - beta2**step)).sqrt() + eps)
    return -(adam_step @ target), True


def check_adam_scores(run_dir, rounds) -> None:
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(run_dir)
    assert store.manifest.score == "adam"
    preconditioned = []
    for round_index in rounds:
        expected, adam = brute_force_adam_scores(run_dir, round_index)
        stored = torch.tensor(store.read_records(round_index).to_pydict()["influence"], dtype=expected.dtype)
        assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max())), round_index
        preconditioned.append(adam)
    assert preconditioned == [False] + [True] * (len(rounds) - 1)


def test_adam_aware_scores_equal_brute_force_ppo(tmp_path):
    """iif_score='adam' under PPO: round 1 scores raw (no step yet), later rounds preconditioned."""
    train(tmp_path, rounds=3, iif_score="adam", num_mini_batches=2, num_ppo_epochs=2)
    check_adam_scores(tmp_path, [1, 2, 3])


def test_adam_aware_scores_equal_brute_force_grpo(tmp_path):
    from test_grpo import build

    build(tmp_path, iif_score="adam", iif_store_optimizer_state=True, iif_drop_fraction=0.5, max_steps=3).train()
    check_adam_scores(tmp_path, [1, 2, 3])


def test_adam_aware_scores_differ_from_raw(tmp_path):
    """The preconditioner changes the ranking (else the option would be a no-op on this set-up)."""
    from rlhf_influence.store import AttributionStore

    train(tmp_path / "raw", rounds=2, num_mini_batches=2)
    train(tmp_path / "adam", rounds=2, num_mini_batches=2, iif_score="adam")
    raw, adam = (AttributionStore.open(tmp_path / kind).read_records(2).to_pydict()["influence"] for kind in ("raw", "adam"))
    assert raw != pytest.approx(adam, rel=1e-2)


def test_settings_that_read_adams_moments_are_refused_under_deepspeed():
    from types import SimpleNamespace

    from rlhf_influence.iif.settings import IIFSettings
    from rlhf_influence.trainer.shared import check_optimizer_state_access

    deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object()))
    plain = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))
    check_optimizer_state_access(IIFSettings(iif_score="adam", iif_store_optimizer_state=True), plain)
    check_optimizer_state_access(IIFSettings(), deepspeed)
    with pytest.raises(ValueError, match=r"iif_score='adam' and iif_store_optimizer_state need .* partitioned"):
        check_optimizer_state_access(IIFSettings(iif_score="adam", iif_store_optimizer_state=True), deepspeed)
    with pytest.raises(ValueError, match="iif_score must be one of"):
        IIFSettings(iif_score="cosine").check_iif_settings()


def test_intervene_says_which_moments_its_reruns_start_from(stored_run, tmp_path, capsys):
    from rlhf_influence.audit.intervention import intervene_return
    from rlhf_influence.cli import main

    assert intervene_return(stored_run, 2, remove=2, random_draws=1).moments == "stored"
    assert main(["intervene", str(stored_run), "--round", "2", "--return-target"]) == 0
    assert "fresh Adam moments" not in capsys.readouterr().out
    plain = tmp_path / "plain"
    train(plain, rounds=1, iif_store_optimizer_state=False)
    assert main(["intervene", str(plain), "--round", "1", "--return-target"]) == 0
    assert "start from fresh Adam moments: the run stored none" in capsys.readouterr().out
