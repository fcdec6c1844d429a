"""The final model, checkpoints and --resume_from_checkpoint, through both recipes.

References: the uninterrupted run of the same command (a resumed run must equal it bit for bit),
PEFT's own loader (the saved policy must generate what the trainer's policy generates).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_influence import IIFGRPOTrainer, IIFPPOTrainer
from rlhf_influence.store import AttributionStore
from rlhf_influence.trainer.checkpoint import INFO_FILE, complete_checkpoints, read_info

ROOT = Path(__file__).resolve().parents[1]
TIMED = ("time/", "seconds", "eps")  # wall-clock metrics: the only ones a resumed run may differ in

PPO_FLAGS = ["--total_episodes", "160", "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true"]
GRPO_FLAGS = ["--max_steps", "10", "--num_iterations", "2", "--iif_schedule", "epoch", "--save_strategy", "steps",
              "--save_steps", "4", "--disable_tqdm", "true"]  # fmt: skip


def recipe_main(algorithm: str):
    spec = importlib.util.spec_from_file_location(f"{algorithm}_iif_recipe", ROOT / "recipes" / f"{algorithm}_iif.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


def killed_run(algorithm: str, kill_round: int, argv: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "killed_run.py"), algorithm, str(kill_round), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, mid-round


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMED)}


def assert_same_store(expected: Path, got: Path) -> None:
    a, b = AttributionStore.open(expected), AttributionStore.open(got)
    assert a.rounds() == b.rounds()
    for r in a.rounds():
        assert a.read_records(r).equals(b.read_records(r)), f"round {r}: records differ"
        assert untimed(a.read_metrics(r)) == untimed(b.read_metrics(r)), f"round {r}: metrics differ"
        files = sorted(p.name for p in a.round_dir(r).glob("*.safetensors"))
        assert files == sorted(p.name for p in b.round_dir(r).glob("*.safetensors"))
        for name in files:
            x, y = load_file(a.round_dir(r) / name), load_file(b.round_dir(r) / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"round {r}: {name} differs"


def assert_same_weights(expected: Path, got: Path) -> None:
    x, y = load_file(expected), load_file(got)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def audit(run: Path) -> str:
    from rlhf_influence.cli import main as cli

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli(["audit", str(run), "--json"]) in (0, None)
    return printed.getvalue()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_sigkill_mid_round_then_resume_equals_the_uninterrupted_run(tmp_path, algorithm):
    flags = PPO_FLAGS if algorithm == "ppo" else GRPO_FLAGS
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert recipe_main(algorithm)(["--output_dir", str(whole), *flags]) == 0

    killed_run(algorithm, 4 if algorithm == "ppo" else 3, ["--output_dir", str(killed), *flags])
    store = AttributionStore(killed / "attribution")
    # PPO: checkpoints after rounds 2 (and 4, if the kill in round 4 had not come); round 3 stored after
    # checkpoint-2. GRPO (2 steps a round): checkpoint-4 after round 2, killed in round 3.
    checkpoint, stored = ("checkpoint-2", 3) if algorithm == "ppo" else ("checkpoint-4", 2)
    assert [p.name for p in complete_checkpoints(killed)] == [checkpoint]
    assert store.rounds() == list(range(1, stored + 1))

    assert recipe_main(algorithm)(["--output_dir", str(killed), *flags, "--resume_from_checkpoint", "true"]) == 0
    assert_same_store(whole / "attribution", killed / "attribution")
    assert_same_weights(whole / "adapter_model.safetensors", killed / "adapter_model.safetensors")
    if algorithm == "ppo":
        assert_same_weights(whole / "value_model" / "model.safetensors", killed / "value_model" / "model.safetensors")
        aside = list((killed / "attribution" / "set_aside").glob("after_round_000002-*/round_000003"))
        assert len(aside) == 1  # the round the resume redid, kept apart
    report = audit(whole)
    assert len(json.loads(report)["rounds"]) == len(AttributionStore.open(whole).rounds())
    assert report == audit(killed).replace(str(killed), str(whole))
