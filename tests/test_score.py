"""`rlhf-influence score` on stored projected gradients against exact scoring at the snapshot."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import spearmanr
from trainer_setup import Setup, ppo_kwargs, seed_everything

from rlhf_influence import IIFPPOConfig, IIFPPOTrainer, LogProbTarget, target_gradients
from rlhf_influence.audit.rescore import score_behaviour
from rlhf_influence.cli import main
from rlhf_influence.store import StoreError

PROMPT, RESPONSE = "the movie was", "great fun lovely"


class ScoresLogProbTarget(IIFPPOTrainer):
    """Scores the round's records exactly against log p(RESPONSE | PROMPT) instead of the return
    target, so the stored `influence` column is the exact reference at each round's snapshot."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.iif.scorer.target_gradient = self.log_prob_target_gradient

    def log_prob_target_gradient(self, policy, target_records):
        target = LogProbTarget.from_text(self.processing_class, [PROMPT], [RESPONSE])
        target.temperature = self.args.temperature + 1e-7
        return target_gradients(policy, target, layout=self.layout).to(self.accelerator.device)


def train_scoring_run(out, **overrides):
    from datasets import concatenate_datasets

    setup = Setup(hidden=128)  # wider than the projection: every adapter side is compressed 2-8x
    seed_everything(0)
    settings = dict(
        per_device_train_batch_size=16, total_episodes=96, iif_schedule="round", iif_drop_fraction=0.5
    )
    kwargs = ppo_kwargs(out, **{**settings, **overrides})
    trainer = ScoresLogProbTarget(
        args=IIFPPOConfig(**kwargs), processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
        reward_model=setup.reward, train_dataset=concatenate_datasets([setup.train] * 2), value_model=setup.value,
        target_dataset=setup.heldout,
    )  # fmt: skip
    seed_everything(0)
    trainer.train()
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_scoring_run(tmp_path_factory.mktemp("score-run"))


def test_score_from_store_agrees_with_exact_scoring(run_dir):
    """A random projection ranks some rounds better than others: the median round >= 0.9, none < 0.8."""
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(run_dir)
    spec = store.manifest.stored_gradients
    assert spec.dim == 64 and spec.sketch_dim == 16384  # the defaults
    assert spec.size == 4096  # this model's per-side projection is shorter than the sketch: kept as it is
    rhos = []
    for round_index in store.rounds():
        exact = store.read_records(round_index).to_pydict()["influence"]
        scored = score_behaviour(run_dir, round_index, PROMPT, RESPONSE)
        assert [r.record for r in scored] == list(range(len(exact)))
        rhos.append(spearmanr(exact, [r.influence for r in scored]).statistic)
    assert len(rhos) == 3
    assert sorted(rhos)[1] >= 0.9 and min(rhos) >= 0.8, rhos


def test_score_from_a_sketched_bfloat16_store_agrees_with_exact_scoring(tmp_path):
    """The per-side projection folded 2x by the sketch, and the snapshot stored in bfloat16. The
    sketch adds variance (benchmarks/README.md measures how much); a target folded differently
    from the records (another seed, or not at all) would rank them at random, near 0."""
    from rlhf_influence.store import AttributionStore

    run = train_scoring_run(
        tmp_path, total_episodes=64, iif_store_sketch_dim=2048, iif_store_snapshot_dtype="bfloat16"
    )
    store = AttributionStore.open(run)
    assert store.manifest.stored_gradients.size == 2048
    assert store.manifest.snapshot_dtype == "bfloat16"
    assert store.read_tensors(1, "gradients")["projected"].shape == (32, 2048)
    assert {t.dtype for t in store.read_tensors(1, "adapter").values()} == {torch.bfloat16}
    for round_index in (1, 2):
        exact = store.read_records(round_index).to_pydict()["influence"]
        rho = spearmanr(
            exact, [r.influence for r in score_behaviour(run, round_index, PROMPT, RESPONSE)]
        ).statistic
        assert rho >= 0.7, rho


def test_records_table_has_the_schemas_and_the_specs_columns(run_dir):
    from rlhf_influence.iif.algorithms import get_algorithm
    from rlhf_influence.store import AttributionStore, schema

    store = AttributionStore.open(run_dir)
    expected = {*schema.RECORD_COLUMNS, *schema.ATTRIBUTION_COLUMNS, *get_algorithm("ppo").record_columns}
    assert "group" not in expected
    assert set(store.read_records(1).column_names) == expected


def test_score_cli_json_and_errors(run_dir, capsys):
    assert (
        main(["score", str(run_dir), "--round", "2", "--prompt", PROMPT, "--response", RESPONSE, "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out["records"]) == 32
    influences = [r["influence"] for r in out["records"]]
    assert influences == sorted(influences, reverse=True)
    assert main(["score", str(run_dir), "--round", "9", "--prompt", PROMPT, "--response", RESPONSE]) == 2
    assert "round 9 is not in the store (complete rounds: 1..3)" in capsys.readouterr().err
    with pytest.raises(StoreError, match="cannot score this behaviour"):
        score_behaviour(run_dir, 1, PROMPT, "")


def test_score_warns_about_words_the_tokenizer_does_not_know(run_dir, capsys):
    assert (
        main(["score", str(run_dir), "--round", "1", "--prompt", PROMPT, "--response", "great zorblax"]) == 0
    )
    err = capsys.readouterr().err
    assert "rlhf-influence: warning: 1 piece(s) of 'the movie was' -> 'great zorblax' are unknown" in err
    assert sum(line.startswith("rlhf-influence: warning:") for line in err.splitlines()) == 1


def test_formation_follows_the_exact_influence_of_each_round(run_dir, capsys):
    from rlhf_influence.audit.analyses import formation
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(run_dir)
    result = formation(run_dir, PROMPT, RESPONSE, top=3)
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    top_found = 0
    for r in result["rounds"]:
        exact = store.read_records(r["round"]).to_pydict()["influence"]
        exact_positive = sum(x > 0 for x in exact) / len(exact)
        assert abs(r["positive_fraction"] - exact_positive) <= 0.15
        exact_top5 = sorted(range(len(exact)), key=lambda i: -exact[i])[:5]
        top_found += r["top_records"][0]["record"] in exact_top5
    # the projected top record is among the exact top 5 of 32 in most rounds (projection noise
    # moves it out now and then; one of the three rounds here is ranked at Spearman 0.86)
    assert top_found >= 2
    assert main(["formation", str(run_dir), "--prompt", PROMPT, "--response", RESPONSE, "--rounds", "2"]) == 0
    assert "records making 'great fun lovely' more likely" in capsys.readouterr().out


def test_adam_aware_scores_from_the_store_agree_with_the_trainers_exact_ones(tmp_path, run_dir, capsys):
    """A run scored exactly and Adam-aware by the trainer (its live optimizer's second moment) against
    the behaviour: the store's Adam-aware scores (its stored moments, the projected gradients) rank
    the records as the trainer's did, better than the store's raw scores do. Round 1 precedes Adam's
    first step: refused by name, left out (and listed) by formation; a run without moments is refused."""
    run = train_scoring_run(tmp_path, iif_score="adam", iif_store_optimizer_state=True)
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(run)
    assert store.manifest.score == "adam" and store.manifest.optimizer_state
    for round_index in (2, 3):
        exact = store.read_records(round_index).to_pydict()["influence"]  # the trainer's, Adam-aware
        adam = [r.influence for r in score_behaviour(run, round_index, PROMPT, RESPONSE, adam=True)]
        raw = [r.influence for r in score_behaviour(run, round_index, PROMPT, RESPONSE)]
        rho_adam, rho_raw = spearmanr(exact, adam).statistic, spearmanr(exact, raw).statistic
        assert rho_adam >= 0.8 and rho_adam > rho_raw + 0.05, (round_index, rho_adam, rho_raw)
    with pytest.raises(StoreError, match="round 1 starts before Adam's first step"):
        score_behaviour(run, 1, PROMPT, RESPONSE, adam=True)
    args = ["formation", str(run), "--prompt", PROMPT, "--response", RESPONSE, "--adam", "--json"]
    capsys.readouterr()  # the training's own logs
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adam"] and out["rounds_before_adam"] == [1] and [r["round"] for r in out["rounds"]] == [2, 3]
    assert main(["score", str(run), "--round", "1", "--prompt", PROMPT, "--response", RESPONSE, "--adam"]) == 2
    assert "leave out --adam for it" in capsys.readouterr().err
    assert main(["score", str(run_dir), "--round", "2", "--prompt", PROMPT, "--response", RESPONSE, "--adam"]) == 2
    assert "--iif_store_optimizer_state true" in capsys.readouterr().err


def test_intervention_without_top_records_moves_the_behaviour_least(run_dir, capsys):
    from rlhf_influence.audit.intervention import intervene

    result = intervene(run_dir, 2, PROMPT, RESPONSE, remove=8, random_draws=3)
    assert result.removed == 8 and len(result.removed_records) == 8
    gain_all = result.target_all - result.target_before
    gain_without_top = result.target_without_top - result.target_before
    gain_without_random = result.target_without_random - result.target_before
    assert gain_without_top < gain_all
    assert gain_without_top < gain_without_random
    assert main(["intervene", str(run_dir), "--round", "2", "--prompt", PROMPT, "--response", RESPONSE,
                 "--remove", "40"]) == 2  # fmt: skip
    assert "--remove must be between 1 and 31" in capsys.readouterr().err


class RecordsTargetGradient(IIFPPOTrainer):
    """Keeps the return-target gradient the trainer scored each round against (first scoring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        return_target_gradient = self.iif.scorer.target_gradient

        def seen(policy, target_records):
            grad = return_target_gradient(policy, target_records)
            self.target_gradients_seen.setdefault(self._round, grad.detach().cpu().clone())
            return grad

        self.iif.scorer.target_gradient = seen

    def build_target_batch(self, batch, round_index, *args):
        self._round = round_index
        return super().build_target_batch(batch, round_index, *args)


@pytest.fixture(scope="module")
def return_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("return-run")
    setup = Setup(hidden=32)
    seed_everything(0)
    kwargs = ppo_kwargs(out, per_device_train_batch_size=8, gradient_accumulation_steps=1, total_episodes=32,
                        iif_num_heldout_prompts=8, iif_drop_fraction=0.5)  # fmt: skip
    trainer = RecordsTargetGradient(
        args=IIFPPOConfig(**kwargs), processing_class=setup.tokenizer, model=setup.peft_policy(), ref_model=None,
        reward_model=setup.reward, train_dataset=setup.train, value_model=setup.value, target_dataset=setup.heldout,
    )  # fmt: skip
    trainer.target_gradients_seen = {}
    seed_everything(0)
    trainer.train()
    return out, trainer.target_gradients_seen


def test_stored_heldout_samples_rebuild_the_target_the_trainer_scored_against(return_run):
    """The held-out samples and advantages in the store give, through the generic target path at
    the stored round-start adapter, the same target gradient the trainer computed in the round."""
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    run_dir, seen = return_run
    scorer = SnapshotScorer(run_dir)
    assert sorted(seen) == scorer.rounds == [1, 2, 3, 4]
    for round_index in scorer.rounds:
        replay = RoundReplay(scorer, round_index)
        target = replay.return_target()
        assert target.input_ids.shape[0] == 8
        scorer.load_round(round_index)
        rebuilt = target_gradients(scorer.policy, target, layout=scorer.layout)
        expected = seen[round_index].to(rebuilt)
        assert torch.allclose(rebuilt, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_intervention_on_the_return_target(return_run, capsys):
    """Removing the records that most raised the round's return target lowers it more than
    removing as many random ones (re-run of the round's update from its snapshot)."""
    from rlhf_influence.audit.intervention import intervene_return

    run_dir, _ = return_run
    wins = 0
    for round_index in (1, 2, 3, 4):
        result = intervene_return(run_dir, round_index, remove=3, random_draws=3)
        assert result.removed == 3 and result.prompt == "" and "heldout_return" in result.target
        wins += result.target_without_top < result.target_without_random
    assert wins >= 3, wins
    assert main(["intervene", str(run_dir), "--round", "2", "--return-target", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["round"] == 2 and out["removed"] == 1  # 10% of 8 records, rounded up
    assert main(["intervene", str(run_dir), "--round", "2", "--return-target", "--prompt", "x"]) == 2
    assert "leave out --prompt/--response" in capsys.readouterr().err
    assert main(["intervene", str(run_dir), "--round", "2"]) == 2
    assert "or use --return-target" in capsys.readouterr().err


def test_jump_best_responses_are_traced_to_the_records_before(run_dir):
    """The target is the sum of the jump round's best responses' log-probs, so each record's
    influence on it is the sum of its `score` on each response (checked against exact scoring
    above); the responses are the jump round's highest-reward ones; kept shares as stated."""
    from rlhf_influence.audit.jumps import Jump, _records, _trace_best_responses
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(run_dir)
    records = {k: _records(store, k) for k in store.rounds()}
    jump = Jump(round=3, reward_delta=0.1, attributed_round=2)
    _trace_best_responses(run_dir, [jump], records, responses=3, top=4)
    best = jump.best_responses
    assert not best.note
    rewards = sorted((r.reward for r in records[3] if r.response.strip()), reverse=True)
    assert [r.reward for r in best.responses] == rewards[:3]
    singles = [score_behaviour(run_dir, 2, r.prompt, r.response) for r in best.responses]
    summed = {rec.record: sum(s[i].influence for s in singles) for i, rec in enumerate(singles[0])}
    expected_top = sorted(summed, key=lambda k: -summed[k])[:4]
    assert [r.record for r in best.records] == expected_top
    for r in best.records:
        assert r.influence == pytest.approx(summed[r.record], rel=1e-4, abs=1e-6)
    kept = {r.record: r.kept for r in records[2]}
    assert best.kept_of_top == sum(kept[k] for k in expected_top) / 4
    raising = [k for k, v in summed.items() if v > 0]
    assert best.kept_of_raising == pytest.approx(sum(kept[k] for k in raising) / len(raising))


def test_audit_json_carries_each_jumps_best_responses(run_dir, capsys):
    from rlhf_influence.store import AttributionStore

    store = AttributionStore.open(run_dir)
    means = [store.read_metrics(k)["objective/scores"] for k in store.rounds()]
    assert means[1] > means[0]  # this run's round 2 is a rise, so z=0 makes it a jump
    assert main(["audit", str(run_dir), "--json", "--z", "0", "--responses", "2", "--top", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    jump = report["jumps"][0]
    assert jump["round"] == 2 and len(jump["best_responses"]["responses"]) == 2
    assert len(jump["best_responses"]["records"]) == 2 and jump["best_responses"]["note"] == ""
    assert {"advantage_mean", "advantage_last"} <= set(jump["top_records"][0])
    assert report["rounds"][0]["kl"] is not None
    assert main(["audit", str(run_dir), "--z", "0", "--responses", "2"]) == 0
    out = capsys.readouterr().out
    assert "round 2's 2 highest-reward responses" in out
    assert "round 1's records that most raised their probability (IIF kept" in out
