"""The main job on 2 CPU processes: every shipped accelerate config as shipped (slow: process start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_filtering import reference_keep

from rlhf_influence.store import AttributionStore

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "ppo_iif.py")
BIN = Path(sys.executable).parent


def launch(
    config: str, out: Path, *flags: str, timeout: int = 240, recipe: str = RECIPE
) -> subprocess.CompletedProcess:
    """A shipped config launched as shipped, with only the process count set (the GPU configs say 8;
    here 2 CPU processes, 1 for single_gpu)."""
    processes = "1" if config == "single_gpu" else "2"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / f"{config}.yaml"),
           "--num_processes", processes, "--main_process_port", "29518", recipe]  # fmt: skip
    cmd += ["--output_dir", str(out), "--disable_tqdm", "true", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:  # a hang becomes a failure
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{config} run did not finish in {timeout} s (hang?)\n{(exc.stderr or b'')[-3000:]}")
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def check_store(
    out: Path, rounds: int, per_process: int, drop_fraction: float, processes: int = 2
) -> list[dict]:
    store = AttributionStore(out / "attribution")
    assert store.rounds() == list(range(1, rounds + 1))
    manifest = json.loads((out / "attribution" / "manifest.json").read_text())
    assert manifest["num_processes"] == processes
    tables = []
    for r in store.rounds():
        t = store.read_records(r).to_pydict()
        n = processes * per_process
        # Every record of every process exactly once.
        assert sorted(t["record"]) == list(range(n))
        assert [t["process"].count(p) for p in range(processes)] == [per_process] * processes
        # Every process made the same decision for every record.
        assert all(len(set(views)) == 1 for views in t["kept_on_each_process"])
        assert all(views[0] == kept for views, kept in zip(t["kept_on_each_process"], t["kept"], strict=True))
        # The decision is the global rule over all processes' scores.
        assert t["kept"] == reference_keep(t["influence"], drop_fraction, 0.1)
        tables.append(t)
    return tables


def per_process_rule(t: dict, drop_fraction: float) -> list[bool]:
    kept = [None] * len(t["record"])
    for p in (0, 1):
        rows = [i for i, q in enumerate(t["process"]) if q == p]
        for i, k in zip(
            rows, reference_keep([t["influence"][i] for i in rows], drop_fraction, 0.1), strict=True
        ):
            kept[i] = k
    return kept


def trained_weights(out: Path) -> dict[str, torch.Tensor]:
    """The run's saved policy adapter (and PPO's value model)."""
    from safetensors.torch import load_file

    weights = {f"policy.{k}": v for k, v in load_file(out / "adapter_model.safetensors").items()}
    if (out / "value_model").is_dir():
        weights.update({f"value.{k}": v for k, v in load_file(out / "value_model" / "model.safetensors").items()})
    if (out / "value_head.safetensors").is_file():  # a value head on the policy's backbone
        weights.update({f"value.{k}": v for k, v in load_file(out / "value_head.safetensors").items()})
    return weights


def check_resume(config: str, out: Path, flags: list[str], recipe: str, refuse_other_count: bool = False) -> None:
    """The finished run resumed from its checkpoint after round 2 ends as it did: every process's
    shard, optimizer state and random streams restored; the rounds it redoes set aside and redone
    the same (to float tolerance: the processes' reductions may round differently)."""
    import shutil

    expected = trained_weights(out)
    store = AttributionStore(out / "attribution")
    rounds = store.rounds()
    tables = {r: store.read_records(r).to_pydict() for r in rounds}
    for path in out.glob("checkpoint-*"):
        if path.name != "checkpoint-2":
            shutil.rmtree(path)
    for name in ("adapter_model.safetensors", "value_model", "value_head.safetensors"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if refuse_other_count:  # another process count is refused in one line, and changes nothing
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "single_gpu.yaml"),
               "--num_processes", "1", recipe, "--output_dir", str(out), "--disable_tqdm", "true", *flags,
               "--resume_from_checkpoint", "true"]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
        assert refused.returncode != 0, refused.stderr[-3000:]  # the recipe's 2, as accelerate reports it
        assert "written by 2 process(es), this run has 1 (resume with the same process count)" in refused.stderr
        assert store.rounds() == rounds
    launch(config, out, *flags, "--resume_from_checkpoint", "true", recipe=recipe, timeout=400)
    got = trained_weights(out)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.allclose(got[name].float(), tensor.float(), rtol=1e-4, atol=1e-6), name
    assert store.rounds() == rounds
    for r in rounds[2:]:  # redone: the same records, scores and decision
        redone = store.read_records(r).to_pydict()
        assert redone["response"] == tables[r]["response"] and redone["kept"] == tables[r]["kept"]
        assert torch.allclose(torch.tensor(redone["influence"]), torch.tensor(tables[r]["influence"]),
                              rtol=1e-3, atol=1e-6)  # fmt: skip
    aside = list((out / "attribution" / "set_aside").glob("after_round_000002-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [f"round_{r:06d}" for r in rounds[2:]]


# config -> (distributed type, processes); without CUDA a MULTI_GPU launch runs as MULTI_CPU (gloo)
DDP = "MULTI_GPU" if torch.cuda.is_available() else "MULTI_CPU"
SHIPPED = {
    "single_gpu": ("NO", 1),
    "multi_gpu": (DDP, 2),
    "deepspeed_zero2": ("DEEPSPEED", 2),
    "deepspeed_zero3": ("DEEPSPEED", 2),
}


def test_every_shipped_config_is_tested():
    # multi_cpu (DDP over gloo, no mixed precision) runs in the reward test below
    assert sorted([*SHIPPED, "multi_cpu"]) == sorted(
        p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml")
    )


@pytest.mark.slow
@pytest.mark.parametrize("config", list(SHIPPED))
def test_shipped_config_runs_as_shipped(tmp_path, config):
    """Each config with its own mixed precision (bf16, which runs on CPU); filtering is global."""
    distributed, processes = SHIPPED[config]
    out = tmp_path / config
    flags = ["--total_episodes", str(128 * processes), "--iif_drop_fraction", "0.5", "--save_steps", "2"]
    launch(config, out, *flags, timeout=400)
    tables = check_store(out, rounds=4, per_process=32, drop_fraction=0.5, processes=processes)
    if processes == 2:  # one process: bit for bit after a SIGKILL in tests/test_checkpoint.py
        check_resume(config, out, flags, RECIPE, refuse_other_count=config == "multi_gpu")
    manifest = json.loads((out / "attribution" / "manifest.json").read_text())
    assert manifest["mixed_precision"] == "bf16"
    assert manifest["distributed_type"] == distributed
    assert all(0 < sum(t["kept"]) < len(t["kept"]) for t in tables)
    if processes == 2:  # filtering was global: a per-process rule would have decided otherwise somewhere
        assert any(per_process_rule(t, 0.5) != t["kept"] for t in tables)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_gpu", "deepspeed_zero2", "deepspeed_zero3"])
def test_shared_value_head_on_two_processes(tmp_path, config):
    """PPO's value head on the policy's backbone, scored with its value term, under DDP, ZeRO-2 and
    ZeRO-3 as shipped (bf16): one global decision, and a resume from a checkpoint ends as the run did."""
    out = tmp_path / config
    flags = ["--total_episodes", "256", "--iif_drop_fraction", "0.5", "--save_steps", "2", "--value_head", "shared",
             "--iif_record_loss", "policy_and_value"]  # fmt: skip
    launch(config, out, *flags, timeout=400)
    tables = check_store(out, rounds=4, per_process=32, drop_fraction=0.5)
    manifest = json.loads((out / "attribution" / "manifest.json").read_text())
    assert (manifest["training"]["value_head"], manifest["training"]["record_loss"]) == ("shared", "policy_and_value")
    assert (out / "value_head.safetensors").is_file() and not (out / "value_model").exists()
    assert any(per_process_rule(t, 0.5) != t["kept"] for t in tables)
    check_resume(config, out, flags, RECIPE)


@pytest.mark.slow
def test_ddp_two_processes_default_task_reward_rises(tmp_path):
    out = tmp_path / "ddp"
    launch("multi_cpu", out, timeout=400)
    store = AttributionStore(out / "attribution")
    manifest = json.loads((out / "attribution" / "manifest.json").read_text())
    assert (manifest["distributed_type"], manifest["mixed_precision"]) == (DDP, "no")
    tables = check_store(out, rounds=len(store.rounds()), per_process=32, drop_fraction=1.0)
    assert len(tables) == 60
    rewards = torch.tensor([store.read_metrics(r)["objective/scores"] for r in store.rounds()])
    # the default task reaches its plateau within 10-20 rounds, so compare the start with the end
    first, last = rewards[:3].mean(), rewards[-15:].mean()
    assert last > first + 0.08, rewards.tolist()


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, flags, rounds, per_process",
    [
        # the processes keep different numbers of completions: TRL gathers one value per completion
        # of a step from every process, so each step's slices are padded to one size
        pytest.param("grpo", ["--max_steps", "3"], 3, 32, id="grpo-default"),
        # one completion a step: a process that kept fewer than 32 of its completions trains on
        # empty (zero-weight) slices while the other trains on kept ones
        pytest.param("grpo", ["--max_steps", "64", "--per_device_train_batch_size", "1", "--steps_per_generation",
                              "32"], 2, 32, id="grpo-empty-slices"),
        # RLOO: padding rows carry no advantage and ratio 1 (its loss is a sequence's)
        pytest.param("rloo", ["--max_steps", "3", "--beta", "0.05"], 3, 32, id="rloo-default"),
    ],
)  # fmt: skip
def test_group_trainers_on_two_processes_filter_globally(tmp_path, algorithm, flags, rounds, per_process):
    """The GRPO and RLOO recipes on 2 CPU processes (DDP over gloo), every negative completion
    dropped: each round holds the whole generation batch, both processes' records, one decision for all."""
    out = tmp_path / algorithm
    recipe = str(ROOT / "recipes" / f"{algorithm}_iif.py")
    launch("multi_cpu", out, *flags, "--iif_drop_fraction", "1.0", "--save_steps", "2", recipe=recipe, timeout=400)
    manifest = json.loads((out / "attribution" / "manifest.json").read_text())
    assert (manifest["algorithm"], manifest["distributed_type"]) == (algorithm, DDP)
    assert manifest["records_per_round"] == 2 * per_process  # the global generation batch
    tables = check_store(out, rounds=rounds, per_process=per_process, drop_fraction=1.0)
    for t in tables:
        assert sorted(set(t["process"])) == [0, 1]
        assert t["group"] == [i // 4 for i in range(2 * per_process)]  # the task's 4 completions a prompt
    assert any(not all(t["kept"]) for t in tables)  # records were dropped
    # the audit rebuilds each round from the store alone (records gathered over processes, their
    # prompts left-padded further) and reproduces the scores the trainer computed on 2 processes
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    scorer = SnapshotScorer(out)
    for round_index, t in zip(scorer.rounds, tables, strict=True):
        replay = RoundReplay(scorer, round_index)
        replayed = replay.influence(replay.return_target()).double()
        stored = torch.tensor(t["influence"], dtype=torch.float64)
        assert torch.allclose(replayed, stored, rtol=1e-4, atol=1e-6 * float(stored.abs().max()))
    if rounds == 3:  # resumed from the checkpoint after round 2, round 3 is redone the same
        check_resume("multi_cpu", out, [*flags, "--iif_drop_fraction", "1.0", "--save_steps", "2"], recipe)
    if "--steps_per_generation" in flags:  # some step had no kept completion on some process
        assert any(
            t["kept"][p * per_process : (p + 1) * per_process].count(True) < 32
            for t in tables
            for p in (0, 1)
        )



@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, flags",
    [
        # 2 micro-batches of 8 a process, accumulated into one step an epoch: all at the round start
        pytest.param("ppo", ["--total_episodes", "64", "--per_device_train_batch_size", "8",
                             "--gradient_accumulation_steps", "2", "--num_mini_batches", "1", "--num_ppo_epochs", "2",
                             "--value_head", "separate"], id="ppo"),
        # 2 slices of 16 completions a process accumulated into the generation batch's one step
        pytest.param("grpo", ["--max_steps", "2", "--per_device_train_batch_size", "16",
                              "--gradient_accumulation_steps", "2"], id="grpo"),
    ],
)  # fmt: skip
def test_gradients_from_the_training_backward_on_two_processes(tmp_path, algorithm, flags):
    """A record-only run on 2 processes (DDP over gloo) with gradients from the training's own
    backward and gradient accumulation: every stored vector is its own record's. No adapter side of
    the toy is wider than the store's projection here (256), so the stored vectors are the exact
    gradients (in float16); a behaviour scored against them equals its exact influence, recomputed in one
    process from the stored records at the stored round-start weights."""
    from rlhf_influence import LogProbTarget
    from rlhf_influence.audit.intervention import RoundReplay
    from rlhf_influence.audit.rescore import SnapshotScorer

    out = tmp_path / algorithm
    recipe = str(ROOT / "recipes" / f"{algorithm}_iif.py")
    launch("multi_cpu", out, *flags, "--iif_target", "none", "--iif_store_gradients", "training",
           "--iif_store_projection_dim", "256", recipe=recipe, timeout=400)  # fmt: skip
    manifest = json.loads((out / "attribution" / "manifest.json").read_text())
    assert (manifest["num_processes"], manifest["target"]) == (2, "none")
    assert manifest["stored_gradients"]["taken"] == "training"
    scorer = SnapshotScorer(out)
    assert scorer.rounds == [1, 2]
    target = LogProbTarget.from_text(scorer.tokenizer, ["the movie was"], ["great fun lovely"],
                                     temperature=scorer.temperature, positions_from_mask=scorer.positions_from_mask)  # fmt: skip
    for round_index in scorer.rounds:
        table = scorer.store.read_records(round_index).to_pydict()
        assert sorted(set(table["process"])) == [0, 1]
        exact = RoundReplay(scorer, round_index).influence(target).double()
        stored = torch.tensor([r.influence for r in scorer.score(round_index, "the movie was", "great fun lovely")],
                              dtype=torch.float64)  # fmt: skip
        assert torch.allclose(stored, exact, rtol=1e-2, atol=1e-2 * float(exact.abs().max())), round_index


@pytest.mark.slow
def test_step_schedule_on_two_processes_equals_the_round_schedule(tmp_path):
    """iif_schedule='step' on 2 processes (DDP over gloo) with 2 accumulated slices a step: each
    process takes its dropped completions' shares out of the averaged gradient; the decisions,
    scores and trained weights are the round schedule's (to float rounding)."""
    recipe = str(ROOT / "recipes" / "grpo_iif.py")
    flags = ["--max_steps", "3", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2",
             "--iif_drop_fraction", "1.0"]  # fmt: skip
    for schedule in ("round", "step"):
        launch("multi_cpu", tmp_path / schedule, *flags, "--iif_schedule", schedule, recipe=recipe, timeout=400)
    by_round = check_store(tmp_path / "round", rounds=3, per_process=32, drop_fraction=1.0)
    in_step = check_store(tmp_path / "step", rounds=3, per_process=32, drop_fraction=1.0)
    for expected, got in zip(by_round, in_step, strict=True):
        assert got["kept"] == expected["kept"] and got["response"] == expected["response"]
        scores = torch.tensor(expected["influence"])
        assert torch.allclose(torch.tensor(got["influence"]), scores, rtol=1e-4, atol=1e-5 * float(scores.abs().max()))
    assert any(not all(t["kept"]) for t in in_step)
    expected, got = trained_weights(tmp_path / "round"), trained_weights(tmp_path / "step")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.allclose(got[name].float(), tensor.float(), atol=1e-5), name
