"""IIFRLOOTrainer against TRL's own RLOOTrainer and its loss, and against what filtering must do."""

from __future__ import annotations

import copy

import pytest
import torch
from test_grpo import grpo_kwargs, lora_state, positive_words, text_dataset
from trainer_setup import PROMPTS, Setup, seed_everything

from rlhf_influence import IIFRLOOConfig, IIFRLOOTrainer
from rlhf_influence.engine.targets import ReturnTarget
from rlhf_influence.store import AttributionStore


def rloo_kwargs(tmp_path, **overrides) -> dict:
    return grpo_kwargs(tmp_path, **overrides)  # the same job: 8 completions a step, 4 a prompt


def build(tmp_path, trainer_class=IIFRLOOTrainer, config_class=IIFRLOOConfig, heldout=True, **overrides):
    setup = Setup()
    kwargs = rloo_kwargs(tmp_path, **overrides)
    extra = {"target_dataset": text_dataset(PROMPTS[::-1])} if heldout else {}
    if config_class is not IIFRLOOConfig:  # TRL's own trainer
        extra = {}
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("iif_")}
    seed_everything(0)  # LoRA's initial weights come from the global stream
    return trainer_class(
        model=copy.deepcopy(setup.policy),
        reward_funcs=positive_words,
        args=config_class(**kwargs),
        train_dataset=text_dataset(PROMPTS),
        processing_class=setup.tokenizer,
        peft_config=setup.lora,
        **extra,
    )


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"num_iterations": 2, "iif_schedule": "epoch", "beta": 0.1, "normalize_advantages": True},
        {"gradient_accumulation_steps": 2, "iif_target": "buffer_return", "beta": 0.0},
    ],
    ids=["default", "iterations-kl-normalised", "accumulation-buffer"],
)
def test_drop_fraction_zero_equals_trl_rloo(tmp_path, settings):
    from trl import RLOOConfig, RLOOTrainer

    trl_settings = {k: v for k, v in settings.items() if not k.startswith("iif_")}
    reference = build(tmp_path / "trl", RLOOTrainer, RLOOConfig, **trl_settings)
    reference.train()
    iif = build(tmp_path / "iif", iif_drop_fraction=0.0, **settings)
    iif.train()
    expected, got = lora_state(reference), lora_state(iif)
    assert expected.keys() == got.keys()
    assert any(bool(v.abs().sum() > 0) for k, v in got.items() if "lora_B" in k)  # it trained
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    store = AttributionStore.open(tmp_path / "iif")
    assert store.manifest.algorithm == "rloo" and store.manifest.training.algorithm == "rloo"
    micro_steps = iif.state.global_step * iif.args.gradient_accumulation_steps
    assert len(store.rounds()) == micro_steps // (iif.args.steps_per_generation * iif.num_iterations)


class RecordsSteps(IIFRLOOTrainer):
    """Keeps, per optimisation step, the completions it trained on and their advantages."""

    def _compute_loss(self, model, inputs):
        self.steps_seen.append(
            (self._round.index, inputs["completion_ids"].clone(), inputs["completion_mask"].clone(),
             inputs["advantages"].clone())
        )  # fmt: skip
        return super()._compute_loss(model, inputs)


def test_filter_drops_most_negative_and_keeps_trl_step_count(tmp_path):
    trainer = build(tmp_path, RecordsSteps, iif_drop_fraction=1.0, max_steps=6,
                    gradient_accumulation_steps=2)  # fmt: skip
    trainer.steps_seen = []
    trainer.train()
    assert trainer.state.global_step == 6  # TRL's step count
    store = AttributionStore.open(tmp_path)
    rounds = store.rounds()
    assert rounds == [1, 2, 3, 4, 5, 6]  # a generation batch (16 completions) per optimizer step
    dropped_any = False
    for k in rounds:
        table = store.read_records(k).to_pydict()
        n = len(table["record"])
        assert n == 16 and table["group"] == [i // 4 for i in range(n)]
        influence, kept = torch.tensor(table["influence"]), torch.tensor(table["kept"])
        negative = influence < 0
        assert int((~kept).sum()) == int(negative.sum())  # p = 1: every negative record dropped
        assert not bool((~kept & ~negative).any())
        dropped_any |= bool((~kept).any())
        # the steps of round k trained exactly on its kept completions; padding rows carry nothing
        batch = store.read_tensors(k, "batch")
        kept_rows = sorted(
            tuple(r) for r, keep in zip(batch["responses"].tolist(), kept.tolist(), strict=True) if keep
        )
        trained = []
        for index, ids, mask, advantages in trainer.steps_seen:
            if index == k:
                real = mask.any(dim=1)
                trained += [tuple(r) for r, m in zip(ids.tolist(), real.tolist(), strict=True) if m]
                assert bool((advantages[~real] == 0).all())
        assert sorted(trained) == kept_rows
        assert store.read_metrics(k)["iif/kept_fraction"] == pytest.approx(float(kept.float().mean()))
    assert dropped_any


def brute_force_influence(trainer, batch, target_records, heldout: bool):
    """-<grad f, grad loss_i> with TRL's own ``_compute_loss`` on each completion alone (RLOO averages
    a slice's sequence losses, the Trainer divides by the accumulation), and the return target
    written out with autograd: an independent reference for the filter's scores."""
    policy = trainer.lora_policy
    params = [p for n, p in policy.named_parameters() if p.requires_grad]
    advantages = target_records.sequence_advantages() if heldout else target_records.advantages
    target = ReturnTarget(target_records.input_ids, target_records.attention_mask, target_records.response_mask,
                          advantages, temperature=trainer.args.temperature)  # fmt: skip
    target.positions_from_mask = False
    target_grad = torch.autograd.grad(target(policy).sum(), params)
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    scores = []
    for i in range(len(batch["completion_ids"])):
        one = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}
        loss = trainer._compute_loss(trainer.model, one) / per_step  # TRL's loss on a slice of one completion
        grads = torch.autograd.grad(loss, params)
        scores.append(-sum(float((a.double() * b.double()).sum()) for a, b in zip(target_grad, grads, strict=True)))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize(
    "settings",
    [{}, {"beta": 0.1, "normalize_advantages": True}, {"iif_target": "buffer_return", "beta": 0.0}],
    ids=["heldout", "kl-normalised-heldout", "buffer"],
)
def test_scores_equal_brute_force_over_trls_loss(tmp_path, settings):
    """After two steps, each completion's score is the brute-force dot product through TRL's own loss."""
    trainer = build(tmp_path, iif_drop_fraction=0.0, max_steps=2, **settings)
    trainer.train()
    trainer.model.train()
    trainer._step = 0
    trainer.start_round(next(iter(trainer.get_train_dataloader())))
    round_ = trainer._round  # the next generation batch, scored at the trained weights
    exact = round_.scorings[0].scores
    reference = brute_force_influence(trainer, round_.batch, round_.target_records, trainer.iif_target == "heldout_return")
    assert torch.allclose(exact, reference, rtol=1e-4, atol=1e-9 + 1e-5 * float(reference.abs().max()))


class ChecksRescoring(IIFRLOOTrainer):
    """At each re-scoring (weights moved by the first pass), the scores next to the brute-force
    reference through TRL's own loss at the same weights: the sequence ratio is not 1 there."""

    def rescore_round(self):
        super().rescore_round()
        round_ = self._round
        reference = brute_force_influence(self, round_.batch, round_.target_records, heldout=True)
        self.rescorings.append((round_.scorings[-1].scores, reference))


def test_rescoring_after_a_step_equals_brute_force_off_policy(tmp_path):
    trainer = build(tmp_path, ChecksRescoring, iif_drop_fraction=0.0, max_steps=4, num_iterations=2,
                    iif_schedule="epoch", beta=0.1, epsilon=0.05, learning_rate=3e-2)  # fmt: skip
    trainer.rescorings = []
    trainer.train()
    assert len(trainer.rescorings) == 2
    for exact, reference in trainer.rescorings:
        assert torch.allclose(exact, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_unsupported_rloo_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="RLOO keeps TRL's step count"):
        IIFRLOOConfig(**rloo_kwargs(tmp_path, iif_keep_steps=False))
    with pytest.raises(ValueError, match="RLOO has no value loss"):
        IIFRLOOConfig(**rloo_kwargs(tmp_path, iif_record_loss="policy_and_value"))
    with pytest.raises(ValueError, match="use_liger_kernel=True changes that loss"):
        IIFRLOOConfig(**rloo_kwargs(tmp_path, use_liger_kernel=True))
    with pytest.raises(TypeError, match="args must be an IIFRLOOConfig"):
        from rlhf_influence import IIFGRPOConfig

        IIFRLOOTrainer(model=Setup().policy, reward_funcs=positive_words, args=IIFGRPOConfig(**grpo_kwargs(tmp_path)),
                       train_dataset=text_dataset(PROMPTS))  # fmt: skip


@pytest.fixture(scope="module")
def rloo_run(tmp_path_factory):
    """A stored IIF-RLOO run (held-out target, projected gradients, p = 0.5, a KL penalty in the reward)."""
    out = tmp_path_factory.mktemp("rloo-run")
    trainer = build(out, iif_drop_fraction=0.5, max_steps=4, beta=0.05)
    trainer.train()
    return out, trainer


def test_records_table_has_the_schemas_and_the_specs_columns(rloo_run):
    from rlhf_influence.iif.algorithms import get_algorithm
    from rlhf_influence.store import AttributionStore, schema

    store = AttributionStore.open(rloo_run[0])
    expected = {*schema.RECORD_COLUMNS, *schema.ATTRIBUTION_COLUMNS, *get_algorithm("rloo").record_columns}
    assert "group" in expected
    assert set(store.read_records(1).column_names) == expected


def test_replay_from_disk_reproduces_the_trainers_scores(rloo_run):
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    out, _ = rloo_run
    scorer = SnapshotScorer(out)
    assert scorer.store.manifest.algorithm == "rloo" and scorer.store.manifest.group_size == 4
    for round_index in scorer.rounds:
        replay = RoundReplay(scorer, round_index)
        replayed = replay.influence(replay.return_target()).double()
        stored = torch.tensor(scorer.store.read_records(round_index).to_pydict()["influence"], dtype=torch.float64)
        assert torch.allclose(replayed, stored, rtol=1e-4, atol=1e-6 * float(stored.abs().max()))


def test_replayed_update_lands_on_the_next_snapshot(tmp_path):
    """A re-run of round 1 on its kept records, from Adam's stored round-start state, gives the
    weights the run stored at round 2's start: the replay's plan and chunk loss are RLOO's."""
    import numpy as np

    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    build(tmp_path, iif_drop_fraction=1.0, max_steps=2, iif_store_optimizer_state=True,
          iif_store_projection_dim=8).train()  # fmt: skip
    scorer = SnapshotScorer(tmp_path)
    replay = RoundReplay(scorer, 1)
    kept = np.flatnonzero(scorer.store.read_records(1).to_pydict()["kept"])
    assert 0 < len(kept) < len(replay)
    replay.rerun(kept, seed=0, moments="stored")
    after = {n: p.detach().clone() for n, p in scorer.policy.named_parameters() if p.requires_grad}
    stored = scorer.store.read_tensors(2, "adapter")
    for name, value in stored.items():
        assert torch.allclose(after[name], value.to(after[name]), atol=1e-5), name  # Adam near eps: not bit for bit


def test_every_audit_command_reads_an_rloo_run(rloo_run, tmp_path, capsys):
    import json

    from rlhf_influence.cli import main

    out, _ = rloo_run
    assert main(["audit", str(out), "--json", "--min-delta", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"]
    assert main(["formation", str(out), "--prompt", "the movie was", "--response", "great fun", "--json"]) == 0
    capsys.readouterr()
    assert main(["intervene", str(out), "--round", "2", "--return-target", "--remove", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 3
    assert main(["report", str(out), "-o", str(tmp_path / "report.html")]) == 0
    assert "IIF" in (tmp_path / "report.html").read_text()


def test_plain_rloo_and_the_adaptive_coefficient(tmp_path):
    """iif_enabled=false builds no filter; the adaptive controller moves RLOO's beta between rounds."""
    trainer = build(tmp_path, iif_enabled=False, max_steps=3, beta=0.05, kl_control="adaptive", kl_target=0.01,
                    kl_horizon=16)  # fmt: skip
    trainer.train()
    assert trainer.iif is None and trainer.store is None and trainer.state.global_step == 3
    coefficients = trainer._metrics["train"]["objective/kl_coef"] or [
        row["objective/kl_coef"] for row in trainer.state.log_history if "objective/kl_coef" in row
    ]
    assert coefficients[0] == pytest.approx(0.05) and coefficients[-1] != pytest.approx(0.05)
