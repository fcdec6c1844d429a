"""Record-only runs (``iif_target='none'``): the store's gradients and snapshots, nothing scored or
dropped, training exactly as plain PPO/GRPO; every audit command reads them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import brute_force_per_record
from test_grpo import build as build_grpo
from test_grpo import lora_state
from trainer_setup import train_ppo as train_tiny_ppo

from rlhf_influence import IIFGRPOTrainer, IIFPPOTrainer
from rlhf_influence.cli import main
from rlhf_influence.iif.settings import IIFSettings
from rlhf_influence.store import AttributionStore

PROMPT, RESPONSE = "the movie was", "great fun lovely"


def train_ppo(out, trainer_class=None, **overrides):
    return train_tiny_ppo(out, trainer_class, heldout=False, total_episodes=24, **overrides)


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("record-only")
    plain = train_ppo(root / "plain", iif_enabled=False)
    recorded = train_ppo(root / "recorded", iif_target="none")
    return root / "recorded", plain, recorded


def policy_lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.policy.named_parameters() if "lora_" in n}


def test_ppo_record_only_trains_exactly_as_plain_ppo(ppo_runs):
    run, plain, recorded = ppo_runs
    expected, got = policy_lora(plain), policy_lora(recorded)
    assert any(bool(v.abs().sum() > 0) for k, v in got.items() if "lora_B" in k)  # it trained
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    store = AttributionStore.open(run)
    assert store.manifest.target == "none" and store.manifest.drop_fraction == 0.0
    assert store.rounds() == [1, 2, 3]
    for k in store.rounds():
        table = store.read_records(k).to_pydict()
        assert all(table["kept"]) and all(math.isnan(v) for v in table["influence"])
        assert store.read_tensors(k, "gradients")["projected"].shape[0] == len(table["record"]) == 8
        metrics = store.read_metrics(k)
        assert metrics["iif/kept_fraction"] == 1.0 and "iif/score_mean" not in metrics
        assert "time/target_sampling_seconds" in metrics  # the round's own records: no sampling


def test_recorded_gradients_are_the_records_own(ppo_runs):
    """Each stored vector is the projection of the record's exact loss gradient at the round start
    (one autograd call per record at the rebuilt snapshot)."""
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    run, _, _ = ppo_runs
    scorer = SnapshotScorer(run)
    for k in scorer.rounds:
        replay = RoundReplay(scorer, k)
        scorer.load_round(k)
        records = replay.records
        normaliser = replay.record_scorer.normaliser(records)
        loss = replay.record_scorer.loss
        exact = brute_force_per_record(scorer.policy, lambda model, r=records, c=normaliser, f=loss: f(model, r, c))
        expected = scorer.projector.project(scorer.layout, exact)
        stored = scorer.store.read_tensors(k, "gradients")["projected"].float()
        assert torch.allclose(stored, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max())), k


def test_every_audit_command_reads_a_record_only_run(ppo_runs, tmp_path, capsys):
    run, _, _ = ppo_runs
    behaviour = ["--prompt", PROMPT, "--response", RESPONSE]
    assert main(["audit", str(run)]) == 0
    assert "recorded only (iif_target none): no scores" in capsys.readouterr().out
    assert main(["audit", str(run), "--json", "--z", "0.1"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == "none"
    assert main(["score", str(run), "--round", "2", *behaviour, "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert len(scored["records"]) == 8 and all(math.isfinite(r["influence"]) for r in scored["records"])
    for command in (["formation", str(run), *behaviour], ["intervene", str(run), "--round", "2", *behaviour],
                    ["report", str(run), "-o", str(tmp_path / "r.html")]):  # fmt: skip
        assert main(command) == 0, command
    capsys.readouterr()
    assert main(["intervene", str(run), "--round", "2", "--return-target"]) == 2
    assert "recorded no return target (iif_target none)" in capsys.readouterr().err


def test_grpo_record_only_trains_exactly_as_plain_grpo(tmp_path):
    plain = build_grpo(tmp_path / "plain", heldout=False, iif_enabled=False)
    plain.train()
    recorded = build_grpo(tmp_path / "recorded", heldout=False, iif_target="none")
    recorded.train()
    expected, got = lora_state(plain), lora_state(recorded)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    store = AttributionStore.open(tmp_path / "recorded")
    assert store.manifest.target == "none" and len(store.rounds()) == 4
    table = store.read_records(1).to_pydict()
    assert all(table["kept"]) and all(math.isnan(v) for v in table["influence"])
    assert store.read_tensors(1, "gradients")["projected"].shape[0] == 8


def test_grpo_store_kl_off_skips_the_reference_pass_and_changes_nothing_else(tmp_path):
    calls = []

    class CountsKL(IIFGRPOTrainer):  # the reference's forward (the policy's side comes from training's)
        def reference_logprobs(self, records):
            calls.append(len(records))
            return super().reference_logprobs(records)

    with_kl = build_grpo(tmp_path / "kl", CountsKL, heldout=False, iif_target="none")
    with_kl.train()
    assert len(calls) == 4  # one a round
    without = build_grpo(tmp_path / "nokl", CountsKL, heldout=False, iif_target="none", iif_store_kl=False)
    without.train()
    assert len(calls) == 4  # no pass of its own
    expected, got = lora_state(with_kl), lora_state(without)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    a, b = AttributionStore.open(tmp_path / "kl"), AttributionStore.open(tmp_path / "nokl")
    assert "objective/kl" in a.read_metrics(2) and "objective/kl" not in b.read_metrics(2)
    columns = ["record", "prompt", "response", "reward", "kept"]  # (the influence is NaN: nothing scored)
    assert a.read_records(2).select(columns).equals(b.read_records(2).select(columns))
    assert torch.equal(a.read_tensors(2, "gradients")["projected"], b.read_tensors(2, "gradients")["projected"])
    assert main(["audit", str(tmp_path / "nokl")]) in (0, None)  # the audit reads a run without a KL curve
    with pytest.raises(ValueError, match="leaves no KL to steer by"):
        IIFSettings(iif_store_kl=False, kl_control="adaptive", kl_target=1.0).check_iif_settings()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"iif_filter": "random"}, "drops nothing, so there is no random control"),
        ({"iif_store": False}, "needs iif_store=true and iif_store_projection_dim > 0"),
        ({"iif_store_projection_dim": 0}, "needs iif_store=true and iif_store_projection_dim > 0"),
    ],
)
def test_record_only_settings_that_record_nothing_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        IIFSettings(iif_target="none", **settings).check_iif_settings()


class KeepsTrainingWeights(IIFPPOTrainer):
    """Keeps, for every micro-batch of each round's first epoch, its records and the LoRA weights it ran at."""

    def train(self, *args, **kwargs):
        self.first_epoch_calls, self._round_calls, self._in_first_epoch = [], [], False
        return super().train(*args, **kwargs)

    def ppo_epoch(self, batch, keep_local, stats, collected=None):
        self._in_first_epoch = collected is not None
        if self._in_first_epoch:
            self._round_calls = []
            self.first_epoch_calls.append(self._round_calls)
        super().ppo_epoch(batch, keep_local, stats, collected)

    def _ppo_loss(self, batch, idx):
        if self._in_first_epoch:
            self._round_calls.append((idx.copy(), policy_lora(self)))
        return super()._ppo_loss(batch, idx)


def test_gradients_from_the_training_backward(tmp_path):
    """iif_store_gradients='training', with gradient accumulation: training is plain PPO bit for bit,
    no pass at the round start, and each stored vector is the projection of the record's exact loss
    gradient (one autograd call, on the round's normaliser) at the weights its first-epoch
    micro-batch ran at."""
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    settings = dict(iif_target="none", iif_store_gradients="training", gradient_accumulation_steps=2,
                    num_mini_batches=1)  # fmt: skip
    plain = train_ppo(tmp_path / "plain", iif_enabled=False, gradient_accumulation_steps=2, num_mini_batches=1)
    trainer = train_ppo(tmp_path / "run", KeepsTrainingWeights, **settings)
    assert all(torch.equal(policy_lora(plain)[k], v) for k, v in policy_lora(trainer).items())

    scorer = SnapshotScorer(tmp_path / "run")
    assert scorer.rounds == [1, 2, 3] and len(trainer.first_epoch_calls) == 3
    params = dict(scorer.policy.named_parameters())
    moved = 0
    for k, calls in zip(scorer.rounds, trainer.first_epoch_calls, strict=True):
        replay = RoundReplay(scorer, k)
        records = replay.records
        normaliser = replay.record_scorer.normaliser(records)
        stored = scorer.store.read_tensors(k, "gradients")["projected"].float()
        metrics = scorer.store.read_metrics(k)
        assert "time/scoring_seconds" not in metrics  # no pass of its own
        seen = set()
        for idx, weights in calls:
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
            part = records.select(torch.as_tensor(idx))
            loss = replay.record_scorer.loss
            exact = brute_force_per_record(scorer.policy, lambda model, r=part, c=normaliser, f=loss: f(model, r, c))
            expected = scorer.projector.project(scorer.layout, exact)
            got = stored[torch.as_tensor(idx)]
            assert torch.allclose(got, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max())), (k, idx)
            seen.update(int(i) for i in idx)
            moved += any(not torch.equal(weights[n], v.to(weights[n])) for n, v in scorer.store.read_tensors(k, "adapter").items())
        assert seen == set(range(8))
    assert moved > 0  # some records were trained on after a step: at weights other than the snapshot's


def test_training_gradients_are_for_record_only_runs():
    with pytest.raises(ValueError, match="is for record-only runs"):
        IIFSettings(iif_target="heldout_return", iif_store_gradients="training").check_iif_settings()


class KeepsGRPOTrainingWeights(IIFGRPOTrainer):
    """Keeps, for every slice of each round's first pass, its records and the LoRA weights it ran at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_pass_calls = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._collecting() is not None:
            rows = self._round.step_rows[self._step % self.args.steps_per_generation]
            self.first_pass_calls.append((self._round.index, rows.copy(), lora_state(self)))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_grpo_gradients_from_trls_backward(tmp_path, loss_type):
    """Under GRPO the hooks sit in TRL's own backward: training equals plain GRPO bit for bit, and each
    stored vector is the projection of the completion's exact loss gradient (on the round's
    normaliser) at the weights its slice ran at, with accumulation and several steps a round."""
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    settings = dict(loss_type=loss_type, gradient_accumulation_steps=2, steps_per_generation=4, max_steps=4)
    plain = build_grpo(tmp_path / "plain", heldout=False, iif_enabled=False, **settings)
    plain.train()
    recorded = build_grpo(tmp_path / "run", KeepsGRPOTrainingWeights, heldout=False, iif_target="none",
                          iif_store_gradients="training", **settings)  # fmt: skip
    recorded.train()
    assert all(torch.equal(lora_state(plain)[k], v) for k, v in lora_state(recorded).items())

    scorer = SnapshotScorer(tmp_path / "run")
    params = dict(scorer.policy.named_parameters())
    checked, moved = set(), 0
    for round_index, rows, weights in recorded.first_pass_calls:
        replay = RoundReplay(scorer, round_index)
        records = replay.records
        normaliser = replay.record_scorer.normaliser(records)
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        real = rows[rows >= 0]
        part = records.select(torch.as_tensor(real))
        loss = replay.record_scorer.loss
        exact = brute_force_per_record(scorer.policy, lambda model, r=part, c=normaliser, f=loss: f(model, r, c))
        expected = scorer.projector.project(scorer.layout, exact)
        got = scorer.store.read_tensors(round_index, "gradients")["projected"].float()[torch.as_tensor(real)]
        assert torch.allclose(got, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max())), (round_index, rows)
        checked.update((round_index, int(i)) for i in real)
        snapshot = scorer.store.read_tensors(round_index, "adapter")
        moved += any(not torch.equal(weights[n], v.to(weights[n])) for n, v in snapshot.items())
    assert len(checked) == len(scorer.rounds) * 32 and moved > 0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"iif_target": "none", "iif_score": "adam"}, "iif_target='none' scores nothing"),
        ({"iif_target": "none", "iif_schedule": "epoch"}, "iif_target='none' records once a round"),
        ({"iif_store_optimizer_state": True, "iif_store": False}, "it needs iif_enabled=true and iif_store=true"),
        ({"iif_target": "none", "iif_store_gradients": "training", "iif_enabled": False}, "is for record-only runs"),
    ],
)
def test_settings_that_would_do_nothing_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        IIFSettings(**settings).check_iif_settings()


def test_reading_adams_moments_needs_adam_and_training_gradients_need_no_fp16():
    from types import SimpleNamespace

    from rlhf_influence.trainer.shared import check_optimizer_state_access

    plain = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="must be torch's Adam or AdamW without amsgrad, got SGD"):
        check_optimizer_state_access(IIFSettings(iif_score="adam"), plain, sgd)
    amsgrad = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], amsgrad=True)
    with pytest.raises(ValueError, match="without amsgrad"):
        check_optimizer_state_access(IIFSettings(iif_store_optimizer_state=True), plain, amsgrad)
    fp16 = IIFSettings(iif_target="none", iif_store_gradients="training")
    fp16.fp16 = True
    with pytest.raises(ValueError, match="fp16's loss scaling"):
        check_optimizer_state_access(fp16, plain)
    step = IIFSettings(iif_schedule="step")  # the in-step filter edits the same gradients
    step.fp16 = True
    with pytest.raises(ValueError, match="iif_schedule='step' edits the step's gradient, which fp16's loss scaling"):
        check_optimizer_state_access(step, plain)


def test_a_grpo_round_cut_short_by_max_steps_is_set_aside(tmp_path):
    """iif_store_gradients='training': a last round whose completions were not all trained on is not
    stored (it would hold gradients for only some records), and the run says so."""
    trainer = build_grpo(tmp_path, heldout=False, iif_target="none", iif_store_gradients="training",
                         steps_per_generation=2, max_steps=3)  # fmt: skip
    with pytest.warns(UserWarning, match="round 2 ended before all its completions were trained on"):
        trainer.train()
    assert AttributionStore.open(tmp_path).rounds() == [1]
