"""IIFPPOTrainer against TRL's own PPOTrainer and against what filtering must do."""

from __future__ import annotations

import pytest
import torch
from trainer_setup import Setup, count_positive, ppo_kwargs, seed_everything

from rlhf_influence import IIFPPOConfig, IIFPPOTrainer
from rlhf_influence.store import AttributionStore


def run_iif(tmp_path, setup: Setup, reward=None, **overrides):
    seed_everything(0)
    config = IIFPPOConfig(**ppo_kwargs(tmp_path, **overrides))
    trainer = IIFPPOTrainer(
        args=config,
        processing_class=setup.tokenizer,
        model=setup.peft_policy(),
        ref_model=None,
        reward_model=reward if reward is not None else setup.reward,
        train_dataset=setup.train,
        value_model=setup.value,
        target_dataset=setup.heldout if config.iif_target != "buffer_return" else None,
    )
    seed_everything(0)
    trainer.train()
    return trainer


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_drop_fraction_zero_equals_trl_ppo(tmp_path):
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    reference_setup = Setup()
    seed_everything(0)
    trl_trainer = PPOTrainer(
        args=PPOConfig(**ppo_kwargs(tmp_path / "trl")),
        processing_class=reference_setup.tokenizer,
        model=reference_setup.peft_policy(),
        ref_model=None,
        reward_model=reference_setup.reward,
        train_dataset=reference_setup.train,
        value_model=reference_setup.value,
    )
    before = trainable_state(trl_trainer)
    seed_everything(0)
    trl_trainer.train()
    expected = trainable_state(trl_trainer)

    assert any(not torch.equal(before[k], expected[k]) for k in expected)  # training moved the weights
    # p=0 scores, samples its held-out target (in its own generation) and stores, and still trains
    # exactly like TRL; with IIF switched off none of that runs
    for overrides in ({"iif_drop_fraction": 0.0, "iif_heldout_sampling": "separate"}, {"iif_enabled": False}):
        iif = run_iif(tmp_path / str(overrides), Setup(), **overrides)
        got = trainable_state(iif)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), (overrides, name)
        assert iif.state.global_step == trl_trainer.state.global_step == 2
    rows = [row for row in iif.state.log_history if "objective/scores" in row]
    assert len(rows) == 2
    assert not any(key.startswith("iif/") for row in rows for key in row)
    assert {key for row in rows for key in row if key.startswith("time/")} == {
        "time/rollout_seconds",
        "time/optimisation_seconds",
    }
    assert iif.store is None and not (tmp_path / str(overrides) / "attribution").exists()


def log_rows(trainer) -> list[dict]:
    return [row for row in trainer.state.log_history if "iif/kept_fraction" in row]


@pytest.mark.parametrize("schedule, scorings", [("epoch", 2), ("round", 1)])
def test_schedule_scores_each_epoch_or_once_and_logs_metrics(tmp_path, schedule, scorings):
    setup = Setup()
    trainer = run_iif(tmp_path, setup, iif_schedule=schedule, iif_drop_fraction=1.0)
    rows = log_rows(trainer)
    assert len(rows) == 2  # one per round, through the Trainer's log (report_to backends get them)
    for row in rows:
        assert row["iif/scorings"] == scorings
        for key in ("iif/kept_fraction", "iif/score_mean", "iif/score_std", "iif/fraction_negative",
                    "iif/scoring_seconds", "iif/nonfinite_scores", "objective/scores", "objective/kl",
                    "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "time/rollout_seconds",
                    "time/target_sampling_seconds", "time/scoring_seconds", "time/optimisation_seconds"):  # fmt: skip
            assert key in row, key
        assert 0 < row["iif/kept_fraction"] <= 1
    table = trainer.store.read_records(1).to_pydict()
    assert len(table["record"]) == 8
    assert all(len(x) == scorings for x in table["influence_by_scoring"])
    assert table["influence"] == [x[0] for x in table["influence_by_scoring"]]


def test_drop_rule_applied_and_stored(tmp_path):
    setup = Setup()
    trainer = run_iif(tmp_path, setup, iif_schedule="round", iif_drop_fraction=1.0, iif_min_keep_fraction=0.1)
    for round_index in (1, 2):
        table = trainer.store.read_records(round_index).to_pydict()
        influence = torch.tensor(table["influence"])
        kept = torch.tensor(table["kept"])
        # p = 1: every record with negative influence is dropped (unless the minimum keep binds).
        negative = influence < 0
        assert int(negative.sum()) < 8
        assert torch.equal(kept, ~negative)
        assert set(table["prompt"]) <= set(
            setup.tokenizer.batch_decode([r for r in setup.train["input_ids"]])
        )


class ForcedDecision(IIFPPOTrainer):
    """Test double: keep a fixed set of records; optionally corrupt the dropped ones' data."""

    keep = torch.tensor([True, False, True, True, False, True, True, False])
    corrupt_dropped = False

    def score_and_filter(self, batch, target_batch, *args, **kwargs):
        scored = super().score_and_filter(batch, target_batch, *args, **kwargs)
        if self.corrupt_dropped:
            dropped = (~self.keep).nonzero().flatten()
            batch.advantages[dropped] = 1e4 * torch.randn_like(batch.advantages[dropped])
            batch.returns[dropped] = -1e4
            batch.logprobs[dropped] = 3.0
        decision = type(scored.decision)(keep=self.keep.clone(), num_negative=0, num_nonfinite=0)
        return type(scored)(
            scored.scores, decision, self.keep.numpy(), self.keep[None], scored.seconds, scored.projected
        )

    def _ppo_loss(self, batch, idx):
        self.seen.extend(idx.tolist())
        return super()._ppo_loss(batch, idx)


def test_dropped_records_do_not_reach_the_optimizer(tmp_path):
    results = {}
    for corrupt in (False, True):
        setup = Setup()
        seed_everything(0)
        trainer = ForcedDecision(
            args=IIFPPOConfig(**ppo_kwargs(tmp_path / str(corrupt), total_episodes=8, iif_target="buffer_return")),
            processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
            reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value,
        )  # fmt: skip
        trainer.corrupt_dropped = corrupt
        trainer.seen = []
        seed_everything(0)
        trainer.train()
        assert set(trainer.seen) == {0, 2, 3, 5, 6}  # the kept records, each epoch
        results[corrupt] = trainable_state(trainer)
    for name, value in results[False].items():
        assert torch.equal(value, results[True][name]), name


class CountedSteps(ForcedDecision):
    """ForcedDecision that records each PPO step's records."""

    def _ppo_loss(self, batch, idx):
        self.steps.append(sorted(idx.tolist()))
        return IIFPPOTrainer._ppo_loss(self, batch, idx)


@pytest.mark.parametrize(
    "keep_steps, num_mini_batches, steps_per_epoch", [(False, 4, 3), (True, 4, 4), (True, 8, 5)]
)
def test_keep_steps_keeps_ppos_number_of_steps(tmp_path, keep_steps, num_mini_batches, steps_per_epoch):
    """5 of 8 records kept. Mini-batches of 2: fewer steps by default (3 of PPO's 4), PPO's 4
    smaller ones with iif_keep_steps. Mini-batches of 1: 5 steps, never one without a record
    (it would move the weights on Adam's momentum alone). Only kept records reach a step."""
    setup = Setup()
    seed_everything(0)
    trainer = CountedSteps(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, total_episodes=8, iif_target="buffer_return",
                                       per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                       num_mini_batches=num_mini_batches, iif_keep_steps=keep_steps)),
        processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
        reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value,
    )  # fmt: skip
    trainer.steps = []
    seed_everything(0)
    trainer.train()
    assert AttributionStore.open(trainer.store.path).manifest.keep_steps is keep_steps  # on record
    epochs = trainer.args.num_ppo_epochs
    assert len(trainer.steps) == steps_per_epoch * epochs
    for epoch in range(epochs):
        records = trainer.steps[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
        assert sorted(i for step in records for i in step) == [0, 2, 3, 5, 6]
        assert max(len(step) for step in records) <= 8 // num_mini_batches


class SeenAdvantages(ForcedDecision):
    """ForcedDecision that records the advantages each PPO step and each scoring saw."""

    def _ppo_loss(self, batch, idx):
        self.step_advantages.append(
            (idx.copy(), batch.advantages[idx].clone(), batch.padding_mask[idx].clone())
        )
        return IIFPPOTrainer._ppo_loss(self, batch, idx)

    def score_and_filter(self, batch, target_batch, *args, **kwargs):
        self.scored_advantages.append(batch.advantages.clone())
        return super().score_and_filter(batch, target_batch, *args, **kwargs)


@pytest.mark.parametrize("after", [False, True])
def test_whiten_after_filter_rewhitens_the_kept_records_for_optimisation_only(tmp_path, after):
    """Against a float64 recomputation: with iif_whiten_after_filter the steps see the kept records'
    advantages whitened over the kept records' response tokens (TRL's unbiased masked whitening);
    without it, the round's own; scoring always sees the round's own."""
    import numpy as np

    setup = Setup()
    seed_everything(0)
    trainer = SeenAdvantages(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, total_episodes=8, iif_target="buffer_return",
                                       iif_schedule="epoch", iif_whiten_after_filter=after)),
        processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
        reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value,
    )  # fmt: skip
    trainer.step_advantages, trainer.scored_advantages = [], []
    seed_everything(0)
    trainer.train()
    round_advantages = trainer.scored_advantages[0]
    assert all(
        torch.equal(a, round_advantages) for a in trainer.scored_advantages
    )  # scoring: the round's own
    kept = np.flatnonzero(ForcedDecision.keep.numpy())
    seen = {}
    for idx, adv, pad in trainer.step_advantages:
        for row, i in enumerate(idx.tolist()):
            seen[i] = (adv[row].double(), pad[row])
    assert sorted(seen) == kept.tolist()
    if after:
        values = torch.cat([round_advantages[i].double()[~seen[i][1]] for i in kept])
        mean, std = values.mean(), values.var(unbiased=True).sqrt()
        for i in kept:
            expected = (round_advantages[i].double() - mean) / std
            got, pad = seen[i]
            assert torch.allclose(got[~pad], expected[~pad], atol=1e-5), i
        all_valid = torch.cat([seen[i][0][~seen[i][1]] for i in kept])
        assert abs(float(all_valid.mean())) < 1e-5 and abs(float(all_valid.std()) - 1) < 1e-4
    else:
        for i in kept:
            assert torch.equal(seen[i][0], round_advantages[i].double())


class WrongSign(IIFPPOTrainer):
    """Give record 3 a huge advantage of the sign that lowers the target (checked by autograd)."""

    def score_and_filter(self, batch, target_batch, *args, **kwargs):
        from rlhf_influence import ReturnTarget, token_logprobs

        policy = self.unwrapped.policy
        params = [p for p in policy.parameters() if p.requires_grad]
        pad = self.processing_class.pad_token_id
        target = ReturnTarget(
            target_batch.query_responses, target_batch.query_responses != pad, target_batch.response_mask(),
            target_batch.last_token_advantages(), temperature=self.args.temperature + 1e-7,
        )  # fmt: skip
        v = torch.autograd.grad(target(policy).sum(), params)
        rec = batch.select([3])
        logp = token_logprobs(
            policy, rec.query_responses, rec.query_responses != pad, self.args.temperature + 1e-7
        )
        u = torch.autograd.grad((logp * rec.response_mask()).sum(), params)
        alignment = sum(float((a * b).sum()) for a, b in zip(v, u, strict=True))
        sign = 1.0 if alignment > 0 else -1.0
        batch.advantages[3] = torch.where(batch.padding_mask[3], 0.0, -50.0 * sign)
        return super().score_and_filter(batch, target_batch, *args, **kwargs)


def test_record_with_hugely_wrong_advantage_is_scored_negative_and_dropped(tmp_path):
    setup = Setup()
    seed_everything(0)
    trainer = WrongSign(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, total_episodes=8, iif_schedule="round", iif_drop_fraction=0.5)),
        processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None, reward_model=setup.reward,
        train_dataset=setup.train, value_model=setup.value, target_dataset=setup.heldout,
    )  # fmt: skip
    seed_everything(0)
    trainer.train()
    table = trainer.store.read_records(1).to_pydict()
    influence = torch.tensor(table["influence"])
    assert influence[3] < 0
    assert int(influence.argmin()) == 3
    assert table["kept"][3] is False
    assert table["rank"][3] == 8  # the most harmful of the 8


def test_callable_reward_trains(tmp_path):
    setup = Setup()
    trainer = run_iif(tmp_path, setup, reward=count_positive, iif_drop_fraction=0.5, missing_eos_penalty=None)
    table = trainer.store.read_records(2).to_pydict()
    assert table["reward"] == pytest.approx(count_positive(table["prompt"], table["response"]))
    lora_b = [v for k, v in trainable_state(trainer).items() if "lora_B" in k]
    assert lora_b and all(bool(v.abs().sum() > 0) for v in lora_b)  # LoRA B starts at 0: the policy trained
    model_reward = run_iif(tmp_path / "model", Setup(), iif_drop_fraction=0.5)
    assert len(log_rows(model_reward)) == 2


def test_non_finite_score_is_kept_counted_and_warned(tmp_path):
    class NanScore(IIFPPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record_scores = self.iif.scorer.record_scores

            def first_nan(*args):
                scores, projected = record_scores(*args)
                scores[0] = float("nan")
                return scores, projected

            self.iif.scorer.record_scores = first_nan

    setup = Setup()
    seed_everything(0)
    trainer = NanScore(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, total_episodes=8, iif_schedule="round")),
        processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None, reward_model=setup.reward,
        train_dataset=setup.train, value_model=setup.value, target_dataset=setup.heldout,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="1 record\\(s\\) got a non-finite influence score"):
        trainer.train()
    assert log_rows(trainer)[0]["iif/nonfinite_scores"] == 1
    assert trainer.store.read_records(1).to_pydict()["kept"][0] is True


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"iif_drop_fraction": 1.5}, ValueError, "iif_drop_fraction must be in"),
        ({"iif_drop_fraction": -0.1}, ValueError, "iif_drop_fraction must be in"),
        ({"iif_schedule": "batch"}, ValueError, "iif_schedule must be one of"),
        ({"iif_target": "reward"}, ValueError, "iif_target must be one of"),
        ({"iif_min_keep_fraction": 0.0}, ValueError, "iif_min_keep_fraction"),
        ({"iif_projection_dim": -1}, ValueError, "iif_projection_dim"),
    ],
)
def test_bad_config(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        IIFPPOConfig(**ppo_kwargs(tmp_path, **overrides))


def test_bad_trainer_inputs(tmp_path):
    from rlhf_influence import NoLoraError

    setup = Setup()
    config = IIFPPOConfig(**ppo_kwargs(tmp_path, iif_target="heldout_return"))
    common = dict(
        processing_class=setup.tokenizer, ref_model=None, train_dataset=setup.train, value_model=setup.value
    )
    with pytest.raises(ValueError, match="needs a target_dataset"):
        IIFPPOTrainer(args=config, model=setup.peft_policy(), reward_model=setup.reward, **common)
    config = IIFPPOConfig(**ppo_kwargs(tmp_path))
    with pytest.raises(NoLoraError, match="the policy has none"):
        IIFPPOTrainer(args=config, model=setup.policy, reward_model=setup.reward, **common)
    with pytest.raises(TypeError, match="not a sequence-classification model"):
        IIFPPOTrainer(args=config, model=setup.peft_policy(), reward_model=torch.nn.Linear(2, 2), **common)
    with pytest.raises(TypeError, match="reward_model must be"):
        IIFPPOTrainer(args=config, model=setup.peft_policy(), reward_model="rm", **common)
    small = Setup().train.select(range(6))
    with pytest.raises(ValueError, match="train_dataset has 6 prompts per process, fewer than one round's 8"):
        IIFPPOTrainer(args=config, model=setup.peft_policy(), reward_model=setup.reward,
                      **{**common, "train_dataset": small})  # fmt: skip
    from peft import IA3Config

    with pytest.raises(TypeError, match=r"must be a peft\.LoraConfig"):
        IIFPPOTrainer(
            args=config, model=setup.policy, reward_model=setup.reward, peft_config=IA3Config(), **common
        )


def test_random_filter_control_drops_the_same_number(tmp_path):
    iif = run_iif(tmp_path / "iif", Setup(), iif_schedule="round", iif_drop_fraction=1.0)
    control = run_iif(
        tmp_path / "random", Setup(), iif_schedule="round", iif_drop_fraction=1.0, iif_filter="random"
    )
    first_iif = iif.store.read_records(1).to_pydict()
    first_control = control.store.read_records(1).to_pydict()
    assert first_iif["influence"] == first_control["influence"]  # same first round, same scores
    assert sum(first_iif["kept"]) == sum(first_control["kept"])  # as many dropped
    assert first_iif["kept"] != first_control["kept"]  # but not the same ones
    assert AttributionStore.open(control.store.path).manifest.filter == "random"


class BruteForceReference(IIFPPOTrainer):
    """Recomputes each scoring's influence by brute force: one autograd call per record's PPO loss
    and one for the buffer target, at the weights the trainer scores at."""

    def score_and_filter(self, batch, target_batch, *args, **kwargs):
        from rlhf_influence import ReturnTarget, ppo_policy_loss

        policy = self.unwrapped.policy
        params = [p for p in policy.parameters() if p.requires_grad]
        pad = self.processing_class.pad_token_id
        temperature = self.args.temperature + 1e-7
        qr, context = batch.query_responses, batch.context_length
        pad_left = lambda t: torch.nn.functional.pad(t, (context, 0))  # noqa: E731
        target = ReturnTarget.from_buffer(
            qr, qr != pad, batch.response_mask(), pad_left(batch.advantages), temperature
        )
        v = torch.cat([g.flatten() for g in torch.autograd.grad(target(policy).sum(), params)])
        normaliser = float((~batch.padding_mask).sum()) / len(batch) * self.args.per_device_train_batch_size
        reference = []
        for i in range(len(batch)):
            rec = batch.select([i])
            loss = ppo_policy_loss(
                policy, rec.query_responses, rec.query_responses != pad, rec.response_mask(),
                pad_left(rec.advantages), pad_left(rec.logprobs), clip_range=self.args.cliprange,
                normaliser=normaliser, temperature=temperature,
            )  # fmt: skip
            g = torch.cat([x.flatten() for x in torch.autograd.grad(loss.sum(), params)])
            reference.append(-float(v @ g))
        scored = super().score_and_filter(batch, target_batch, *args, **kwargs)
        self.pairs.append((torch.tensor(reference), scored.scores.float()))
        return scored


@pytest.mark.parametrize("schedule", ["round", "epoch"])
def test_buffer_target_scores_match_brute_force(tmp_path, schedule):
    """The round-start scoring takes the buffer target's gradient from the records' own (one pass);
    a later epoch's scoring, where the ratio is no longer 1, takes it separately. Both must equal
    brute-force influence."""
    setup = Setup()
    seed_everything(0)
    trainer = BruteForceReference(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, iif_target="buffer_return", iif_schedule=schedule)),
        processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None, reward_model=setup.reward,
        train_dataset=setup.train, value_model=setup.value,
    )  # fmt: skip
    trainer.pairs = []
    seed_everything(0)
    trainer.train()
    assert len(trainer.pairs) == (2 if schedule == "round" else 4)
    for reference, scores in trainer.pairs:
        scale = float(reference.abs().max())
        assert scale > 0
        torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-5 * scale)


class ChecksSamples(IIFPPOTrainer):
    """Counts generation calls, and checks each round's sampling log-probs, of the round's records and
    of the held-out target's, against a fresh forward of the policy over the stored token ids."""

    def sample(self, queries, chunk_size=None):
        self.generations += 1
        return super().sample(queries, chunk_size)

    def build_target_batch(self, batch, round_index, heldout_samples=None):
        from rlhf_influence import token_logprobs

        target = super().build_target_batch(batch, round_index, heldout_samples)
        pad = self.processing_class.pad_token_id
        for part, prompts in ((batch, None), (target, self._heldout_queries(round_index))):
            with torch.no_grad():
                fresh = token_logprobs(
                    self.unwrapped.policy, part.query_responses, part.query_responses != pad,
                    self.args.temperature + 1e-7,
                )[:, part.context_length :]  # fmt: skip
            valid = ~part.padding_mask
            torch.testing.assert_close(part.logprobs[valid], fresh[valid], rtol=1e-4, atol=1e-4)
            if prompts is not None:  # the held-out prompts, cut back to their own padding
                assert torch.equal(part.queries, prompts)
        self.checked.append((len(batch), len(target)))
        return target


@pytest.mark.parametrize("sampling, generations", [("with_rollout", 2), ("separate", 4)])
def test_heldout_samples_come_from_the_current_policy_in_one_generation_or_two(
    tmp_path, sampling, generations
):
    setup = Setup()
    seed_everything(0)
    trainer = ChecksSamples(
        args=IIFPPOConfig(**ppo_kwargs(tmp_path, iif_heldout_sampling=sampling, iif_num_heldout_prompts=6)),
        processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None, reward_model=setup.reward,
        train_dataset=setup.train, value_model=setup.value, target_dataset=setup.heldout,
    )  # fmt: skip
    trainer.generations, trainer.checked = 0, []
    seed_everything(0)
    trainer.train()
    assert trainer.generations == generations  # 2 rounds
    assert trainer.checked == [(8, 6), (8, 6)]


def test_iif_settings_are_one_dataclass_the_config_takes():
    """Every iif_* knob, its help and its check live in IIFSettings (free of TRL); IIFPPOConfig adds none."""
    import dataclasses
    import inspect

    from rlhf_influence import IIFSettings

    assert issubclass(IIFPPOConfig, IIFSettings)
    iif = {f.name for f in dataclasses.fields(IIFPPOConfig) if f.name.startswith("iif_")}
    # and what the IIF trainers add to TRL's, whatever the algorithm: saving the trained policy, KL control
    added = {"save_final_model", "kl_control", "kl_target", "kl_horizon"}
    assert iif | added == {f.name for f in dataclasses.fields(IIFSettings)} and len(iif) == 23
    assert all(f.metadata.get("help") for f in dataclasses.fields(IIFSettings))
    assert "iif_" not in "".join(inspect.get_annotations(IIFPPOConfig))
