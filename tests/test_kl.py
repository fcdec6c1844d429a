"""The KL to the reference (exact over the vocabulary) and the adaptive KL coefficient, in both trainers.

References: torch's own categorical KL in float64; the controller's formula written out here
(Ziegler et al. 2019, the paper's code) and applied to the KL each round logged.
"""

from __future__ import annotations

import pytest
import torch
from test_checkpoint import fails_with, recipe_main
from test_grpo import build
from trainer_setup import Setup, ppo_kwargs, seed_everything

from rlhf_influence import IIFGRPOTrainer, IIFPPOConfig, IIFPPOTrainer
from rlhf_influence.iif.kl import KLController, exact_kl


def reference_step(beta: float, kl: float, target: float, records: int, horizon: int) -> float:
    error = kl / target - 1.0
    error = -0.2 if error < -0.2 else 0.2 if error > 0.2 else error
    return beta * (1.0 + error * records / horizon)


def test_adaptive_coefficient_follows_the_formula_on_a_scripted_kl_sequence():
    controller = KLController.from_settings(0.04, "adaptive", target=0.1, horizon=10_000)
    beta = 0.04
    for kl in [0.0, 0.05, 0.1, 0.11, 0.5, 3.0, 0.09, 1e-6, 0.1]:
        beta = reference_step(beta, kl, 0.1, 256, 10_000)
        assert controller.update(kl, 256) == pytest.approx(beta, rel=1e-12)
    fixed = KLController.from_settings(0.04, "fixed", target=0.1, horizon=10)
    assert [fixed.update(kl, 256) for kl in (0.0, 5.0)] == [0.04, 0.04]
    with pytest.raises(ValueError, match="kl_control must be one of"):
        KLController.from_settings(0.04, "pid", 0.1, 10)


def test_exact_kl_equals_the_categorical_kl_and_is_never_negative():
    torch.manual_seed(0)
    logits, ref = torch.randn(3, 5, 11) * 3, torch.randn(3, 5, 11) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits.double()), torch.distributions.Categorical(logits=ref.double())
    )
    assert torch.allclose(exact_kl(logits, ref, mask).double(), (expected * mask).sum(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(exact_kl(logits, logits, mask), torch.zeros(3))


def ppo_trainer(tmp_path, **overrides) -> IIFPPOTrainer:
    setup = Setup()
    config = IIFPPOConfig(**ppo_kwargs(tmp_path, total_episodes=48, **overrides))
    trainer = IIFPPOTrainer(args=config, processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
                            reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value,
                            target_dataset=setup.heldout)  # fmt: skip
    seed_everything(0)
    trainer.train()
    return trainer


def test_ppo_adaptive_coefficient_per_round_and_the_rewards_it_penalises(tmp_path):
    trainer = ppo_trainer(tmp_path, kl_coef=0.05, kl_control="adaptive", kl_target=0.01, kl_horizon=16)
    rows = trainer.iif_history
    coefs, kls = [r["objective/kl_coef"] for r in rows], [r["objective/kl_exact"] for r in rows]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at zero: the policy is the reference
    assert all(k >= 0 for k in kls) and any(k > 0.01 for k in kls)
    expected = [0.05]
    for kl in kls[:-1]:
        expected.append(reference_step(expected[-1], kl, 0.01, 8, 16))
    assert coefs == pytest.approx(expected, rel=1e-9)
    assert coefs[-1] != coefs[0]  # it moved
    for row in rows:  # the round's rewards used the round's coefficient on TRL's per-token estimate
        assert row["objective/non_score_reward"] == pytest.approx(-row["objective/kl_coef"] * row["objective/kl"], rel=1e-4, abs=1e-8)
    stored = [trainer.store.read_metrics(r)["objective/kl_coef"] for r in trainer.store.rounds()]
    assert stored == pytest.approx(coefs)
    from rlhf_influence.audit.jumps import audit_run
    from rlhf_influence.audit.report import RunCurves, reward_kl_figure

    report = audit_run(tmp_path)
    assert [r.kl for r in report.rounds] == pytest.approx(kls) and [r.kl_coef for r in report.rounds] == pytest.approx(coefs)
    figure = reward_kl_figure(RunCurves.of(report), [], None, "")
    assert [t["y"] for t in figure["data"] if t["name"] == "KL coefficient"] == [pytest.approx(coefs)]


def test_ppo_fixed_coefficient_stays(tmp_path):
    rows = ppo_trainer(tmp_path, kl_coef=0.05).iif_history
    assert {r["objective/kl_coef"] for r in rows} == {0.05}


@pytest.mark.parametrize("iif_enabled", [True, False], ids=["iif", "plain"])
def test_grpo_adaptive_beta_follows_the_formula(tmp_path, iif_enabled):
    trainer = build(tmp_path, max_steps=4, beta=0.04, kl_control="adaptive", kl_target=0.01, kl_horizon=16,
                    iif_enabled=iif_enabled)  # fmt: skip
    trainer.train()
    if iif_enabled:
        rows = trainer.iif_history
    else:  # TRL's logs, one round a step
        rows = [r for r in trainer.state.log_history if "objective/kl_coef" in r]
    coefs, kls = [r["objective/kl_coef"] for r in rows], [r["objective/kl"] for r in rows]
    assert len(coefs) == 4 and all(k >= 0 for k in kls)
    expected = [0.04]
    for kl in kls[:-1]:
        expected.append(reference_step(expected[-1], kl, 0.01, 8, 16))
    assert coefs == pytest.approx(expected, rel=1e-6)
    assert trainer.beta == coefs[-1]  # the next step comes when a next round starts


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_plain_runs_take_the_adaptive_controller_from_both_recipes(tmp_path, capsys, algorithm):
    length = ["--total_episodes", "64"] if algorithm == "ppo" else ["--max_steps", "2", "--beta", "0.04"]
    argv = ["--output_dir", str(tmp_path / "run"), *length, "--iif_enabled", "false", "--kl_control", "adaptive",
            "--disable_tqdm", "true", "--save_strategy", "no"]  # fmt: skip
    assert recipe_main(algorithm)(argv) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "algorithm, flags, message",
    [
        ("ppo", ["--kl_control", "pid"], "invalid choice: 'pid'"),
        ("ppo", ["--kl_control", "adaptive", "--kl_target", "-1"], "needs kl_target, a KL per response > 0"),
        ("ppo", ["--kl_control", "adaptive", "--kl_target", "nan"], "needs kl_target, a KL per response > 0"),
        ("ppo", ["--kl_horizon", "0"], "kl_horizon must be a whole number >= 1"),
        ("ppo", ["--kl_control", "adaptive", "--kl_coef", "0"], "give kl_coef > 0"),
        ("grpo", ["--kl_control", "adaptive"], "give beta > 0"),
    ],
)
def test_bad_kl_settings_are_refused_in_one_line(tmp_path, capsys, no_model_loads, algorithm, flags, message):
    fails_with(capsys, algorithm, ["--output_dir", str(tmp_path / "x"), *flags], message)


class ChecksRoundKL(IIFGRPOTrainer):
    """Beside the run's own round KL, the one a separate forward of the policy gives at the round start."""

    def start_round(self, generation_batch):
        super().start_round(generation_batch)
        self.separate_kl.append(self.kl_to_reference(self._round.records))


@pytest.mark.parametrize(
    ("settings", "from_training"),
    [
        ({"iif_target": "none", "iif_store_gradients": "training"}, True),
        ({"iif_target": "none", "gradient_accumulation_steps": 2}, True),
        ({"iif_schedule": "step", "iif_drop_fraction": 1.0, "beta": 0.1, "loss_type": "grpo"}, True),
        ({"iif_drop_fraction": 0.0, "num_iterations": 2, "max_steps": 6}, True),
        ({"iif_drop_fraction": 1.0}, False),  # the kept completions only: a forward of its own
        ({"iif_target": "none", "steps_per_generation": 2}, False),  # the second slice after a step
    ],
    ids=["record-only", "record-accumulation", "step-kl-term", "p0-iterations", "round-p1", "two-steps-a-round"],
)
def test_grpo_round_kl_from_the_training_forward_equals_a_separate_forward(tmp_path, settings, from_training):
    """The store's KL curve takes the policy's log-probs from TRL's own first-pass forward where that
    pass trains every completion at the round-start weights: one forward a round fewer (two with
    beta > 0), the same KL as a forward of its own at the round start."""
    from rlhf_influence.store import AttributionStore

    trainer = build(tmp_path, ChecksRoundKL, **{"max_steps": 4, **settings})
    trainer.separate_kl = []
    assert trainer._kl_from_training() is from_training
    trainer.train()
    store = AttributionStore.open(tmp_path)
    stored = [store.read_metrics(k)["objective/kl"] for k in store.rounds()]
    assert len(stored) == len(trainer.separate_kl) >= 2
    assert stored[1] > 0  # the policy moved from the reference
    assert stored == pytest.approx(trainer.separate_kl, rel=1e-4, abs=1e-7)
