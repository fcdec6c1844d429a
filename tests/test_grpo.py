"""IIFGRPOTrainer against TRL's own GRPOTrainer and its loss, and against what filtering must do."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trainer_setup import PROMPTS, Setup, count_positive, seed_everything

from rlhf_influence import IIFGRPOConfig, IIFGRPOTrainer
from rlhf_influence.engine.targets import ReturnTarget, token_logprobs
from rlhf_influence.store import AttributionStore


def positive_words(prompts, completions, **kwargs):
    return count_positive(prompts, completions)


def grpo_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=7,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        iif_num_heldout_prompts=4,
    )
    kwargs.update(overrides)
    return kwargs


def text_dataset(prompts) -> Dataset:
    return Dataset.from_dict({"prompt": list(prompts)})


def build(tmp_path, trainer_class=IIFGRPOTrainer, config_class=IIFGRPOConfig, heldout=True, **overrides):
    setup = Setup()
    kwargs = grpo_kwargs(tmp_path, **overrides)
    extra = {"target_dataset": text_dataset(PROMPTS[::-1])} if heldout else {}
    if config_class is not IIFGRPOConfig:  # TRL's own trainer
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


def lora_state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"num_iterations": 2, "iif_schedule": "epoch", "beta": 0.1, "loss_type": "grpo"},
        {"gradient_accumulation_steps": 2, "iif_target": "buffer_return"},
    ],
    ids=["dapo", "grpo-iterations-kl", "accumulation-buffer"],
)
def test_drop_fraction_zero_equals_trl_grpo(tmp_path, settings):
    from trl import GRPOConfig, GRPOTrainer

    trl_settings = {k: v for k, v in settings.items() if not k.startswith("iif_")}
    reference = build(tmp_path / "trl", GRPOTrainer, GRPOConfig, **trl_settings)
    reference.train()
    iif = build(tmp_path / "iif", iif_drop_fraction=0.0, **settings)
    iif.train()
    expected, got = lora_state(reference), lora_state(iif)
    assert expected.keys() == got.keys()
    assert any(bool(v.abs().sum() > 0) for k, v in got.items() if "lora_B" in k)  # it trained
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    store = AttributionStore.open(tmp_path / "iif")
    micro_steps = iif.state.global_step * iif.args.gradient_accumulation_steps
    assert len(store.rounds()) == micro_steps // (iif.args.steps_per_generation * iif.num_iterations)


class RecordsSteps(IIFGRPOTrainer):
    """Keeps, per optimisation step, the completions it trained on, and each round's records."""

    def _compute_loss(self, model, inputs):
        self.steps_seen.append(
            (self._round.index, inputs["completion_ids"].clone(), inputs["completion_mask"].clone(),
             int(inputs["num_items_in_batch"]))
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
        assert n == 16
        assert table["group"] == [i // 4 for i in range(n)]
        influence = torch.tensor(table["influence"])
        negative = influence < 0
        kept = torch.tensor(table["kept"])
        assert int((~kept).sum()) == int(negative.sum())  # p = 1: every negative record dropped
        assert not bool((~kept & ~negative).any())
        dropped_any |= bool((~kept).any())
        # the steps of round k trained exactly on its kept completions
        batch = store.read_tensors(k, "batch")
        kept_rows = sorted(
            tuple(r) for r, keep in zip(batch["responses"].tolist(), kept.tolist(), strict=True) if keep
        )
        trained, kept_tokens = [], int(batch["completion_mask"][kept].sum())
        for index, ids, mask, num_items in trainer.steps_seen:
            if index == k:
                trained += [tuple(r) for r, m in zip(ids.tolist(), mask.tolist(), strict=True) if any(m)]
                assert num_items == kept_tokens  # dapo's normaliser counts what is kept
        assert sorted(trained) == kept_rows
        metrics = store.read_metrics(k)
        assert metrics["iif/kept_fraction"] == pytest.approx(float(kept.float().mean()))
        if k == 1:  # LoRA's B starts at 0: the first round's policy is the reference
            assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-6)
        else:
            assert metrics["objective/kl"] > 0
    assert dropped_any


def brute_force_influence(trainer, batch, records, target_records, heldout: bool):
    """-<grad f, grad loss_i> with TRL's own ``_compute_loss`` on each completion alone, and the
    return target written out with autograd: an independent reference for the filter's scores."""
    policy = trainer.lora_policy
    params = [p for n, p in policy.named_parameters() if p.requires_grad]
    advantages = target_records.sequence_advantages() if heldout else target_records.advantages
    target = ReturnTarget(target_records.input_ids, target_records.attention_mask, target_records.response_mask,
                          advantages, temperature=trainer.args.temperature)  # fmt: skip
    target.positions_from_mask = False
    target_grad = torch.autograd.grad(target(policy).sum(), params)
    micro = trainer.args.per_device_train_batch_size
    tokens = records.num_tokens().double()
    scores = []
    for i in range(len(records)):
        one = {
            k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()
        }
        loss = trainer._compute_loss(trainer.model, one)  # TRL's loss on a slice of one completion
        if trainer.args.loss_type in ("grpo", "dr_grpo"):  # a slice's loss is the mean of its completions'
            loss = loss / micro
        elif trainer.args.loss_type == "bnpo":  # a slice's loss is its token mean: the share of T_i tokens
            loss = loss * float(tokens[i] / (tokens.mean() * micro))
        grads = torch.autograd.grad(loss, params)
        scores.append(
            -sum(float((a.double() * b.double()).sum()) for a, b in zip(target_grad, grads, strict=True))
        )
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_type": "dapo"},
        {"loss_type": "grpo", "beta": 0.1},
        {"loss_type": "bnpo", "iif_target": "buffer_return"},
    ],
    ids=["dapo-heldout", "grpo-kl-heldout", "bnpo-buffer"],
)
def test_scores_equal_brute_force_over_trls_loss(tmp_path, settings):
    """After two steps (weights moved from the sampling ones where num_iterations > 1), each
    completion's score is the brute-force dot product through TRL's own loss."""
    trainer = build(tmp_path, iif_drop_fraction=0.0, max_steps=2, **settings)
    trainer.train()
    trainer.model.train()
    trainer._step = 0
    generation_batch = next(iter(trainer.get_train_dataloader()))
    trainer.start_round(generation_batch)
    round_ = trainer._round  # the next generation batch, scored at the trained weights
    exact = round_.scorings[0].scores
    reference = brute_force_influence(
        trainer, round_.batch, round_.records, round_.target_records, trainer.iif_target == "heldout_return"
    )
    assert torch.allclose(exact, reference, rtol=1e-4, atol=1e-9 + 1e-5 * float(reference.abs().max()))


def test_unsupported_grpo_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_type='cispo' changes that loss"):
        IIFGRPOConfig(**grpo_kwargs(tmp_path, loss_type="cispo"))
    with pytest.raises(ValueError, match="GRPO keeps TRL's step count"):
        IIFGRPOConfig(**grpo_kwargs(tmp_path, iif_keep_steps=False))
    with pytest.raises(ValueError, match="GRPO samples the held-out target apart"):
        IIFGRPOConfig(**grpo_kwargs(tmp_path, iif_heldout_sampling="with_rollout"))
    IIFGRPOConfig(**grpo_kwargs(tmp_path, loss_type="cispo", iif_enabled=False))  # plain GRPO: anything goes
    with pytest.raises(ValueError, match="needs a target_dataset"):
        build(tmp_path, heldout=False, iif_target="heldout_return")


def test_token_logprobs_positions_follow_trls_grpo(tmp_path):
    """GRPO's per-token log-probs (TRL's own function) equal token_logprobs without mask positions."""
    trainer = build(tmp_path, max_steps=1)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width)
        ours = token_logprobs(trainer.model, ids, mask, trainer.args.temperature, positions_from_mask=False)
    valid = batch["completion_mask"].bool()
    assert torch.allclose(ours[:, -width:][valid], trl_logps[valid], atol=1e-5)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A stored IIF-GRPO run (held-out target, projected gradients, p = 0.5)."""
    out = tmp_path_factory.mktemp("grpo-run")
    trainer = build(out, iif_drop_fraction=0.5, max_steps=4)
    trainer.train()
    return out, trainer


def test_replay_from_disk_reproduces_the_trainers_scores(grpo_run):
    """The audit's replay rebuilds the policy, records, loss and held-out target from the store alone;
    its exact influence equals what the trainer scored during training."""
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    out, _ = grpo_run
    scorer = SnapshotScorer(out)
    assert scorer.store.manifest.algorithm == "grpo" and scorer.store.manifest.group_size == 4
    for round_index in scorer.rounds:
        replay = RoundReplay(scorer, round_index)
        replayed = replay.influence(replay.return_target()).double()
        stored = torch.tensor(
            scorer.store.read_records(round_index).to_pydict()["influence"], dtype=torch.float64
        )
        assert torch.allclose(replayed, stored, rtol=1e-4, atol=1e-6 * float(stored.abs().max()))


def test_every_audit_command_reads_a_grpo_run(grpo_run, tmp_path, capsys):
    import json

    from scipy.stats import spearmanr

    from rlhf_influence.audit.rescore import score_behaviour
    from rlhf_influence.cli import main

    out, _ = grpo_run
    assert main(["audit", str(out), "--json", "--min-delta", "0"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["rounds"]
    assert main(["diagnose", str(out), "--json"]) == 0
    capsys.readouterr()
    assert (
        main(["formation", str(out), "--prompt", "the movie was", "--response", "great fun", "--json"]) == 0
    )
    capsys.readouterr()
    assert main(["intervene", str(out), "--round", "2", "--return-target", "--remove", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["removed"] == 3 and len(result["removed_records"]) == 3
    assert main(["report", str(out), "-o", str(tmp_path / "report.html")]) == 0
    assert "IIF" in (tmp_path / "report.html").read_text()
    # score: the stored projected gradients rank like exact influence at the snapshot
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer
    from rlhf_influence.engine.targets import LogProbTarget

    scored = score_behaviour(out, 2, "the movie was", "great fun")
    scorer = SnapshotScorer(out)
    target = LogProbTarget.from_text(scorer.tokenizer, ["the movie was"], ["great fun"])
    target.positions_from_mask = False
    exact = RoundReplay(scorer, 2).influence(target)
    assert spearmanr([r.influence for r in scored], exact.tolist()).statistic > 0.8
    table = AttributionStore.open(out).read_records(2).to_pydict()
    assert table["group"] == [i // 4 for i in range(len(table["record"]))]


class ChecksRescoring(IIFGRPOTrainer):
    """At each re-scoring (the second of num_iterations passes, weights moved by the first), the
    scores next to the brute-force reference through TRL's own loss at the same weights."""

    def rescore_round(self):
        super().rescore_round()
        round_ = self._round
        self.rescorings.append(
            (round_.scorings[-1].scores, brute_force_influence(self, round_.batch, round_.records,
                                                               round_.target_records, heldout=True))
        )  # fmt: skip


def test_rescoring_after_a_step_equals_brute_force_off_policy(tmp_path):
    """num_iterations=2 with the epoch schedule: the second scoring sees weights that moved, so the
    ratio differs from 1 (clipped by epsilon, capped by delta, the KL term corrected by it)."""
    trainer = build(tmp_path, ChecksRescoring, iif_drop_fraction=0.0, max_steps=4, num_iterations=2,
                    iif_schedule="epoch", beta=0.1, loss_type="grpo", delta=1.02,
                    learning_rate=3e-2)  # fmt: skip
    trainer.rescorings = []
    trainer.train()
    assert len(trainer.rescorings) == 2
    for exact, reference in trainer.rescorings:
        assert torch.allclose(exact, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_plain_grpo_takes_any_loss_type(tmp_path):
    """iif_enabled=false builds no filter, so loss types IIF cannot score still train (as TRL)."""
    trainer = build(tmp_path, iif_enabled=False, loss_type="cispo", max_steps=1)
    trainer.train()
    assert trainer.iif is None and trainer.store is None and trainer.state.global_step == 1
