"""The main job on 2 CPU processes: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (slow: process start-up)."""

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


def launch(kind: str, out: Path, *flags: str, timeout: int = 240) -> subprocess.CompletedProcess:
    if kind == "ddp":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517", RECIPE]
    else:
        config = ROOT / "accelerate_configs" / f"deepspeed_{kind}.yaml"
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", "29518", RECIPE]  # fmt: skip
    cmd += ["--output_dir", str(out), "--disable_tqdm", "true", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:  # a hang becomes a failure
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{kind} run did not finish in {timeout} s (hang?)\n{(exc.stderr or b'')[-3000:]}")
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def check_store(out: Path, rounds: int, per_process: int, drop_fraction: float) -> list[dict]:
    store = AttributionStore(out / "attribution")
    assert store.rounds() == list(range(1, rounds + 1))
    manifest = json.loads((out / "attribution" / "manifest.json").read_text())
    assert manifest["num_processes"] == 2
    tables = []
    for r in store.rounds():
        t = store.read_records(r).to_pydict()
        n = 2 * per_process
        # Every record of every process exactly once.
        assert sorted(t["record"]) == list(range(n))
        assert [t["process"].count(p) for p in (0, 1)] == [per_process, per_process]
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


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_deepspeed_two_processes(tmp_path, kind):
    out = tmp_path / kind
    launch(kind, out, "--total_episodes", "256", "--iif_drop_fraction", "0.5")
    tables = check_store(out, rounds=4, per_process=32, drop_fraction=0.5)
    # Filtering was global: a per-process rule would have decided otherwise in some round.
    assert any(per_process_rule(t, 0.5) != t["kept"] for t in tables)
    assert all(0 < sum(t["kept"]) < len(t["kept"]) for t in tables)


@pytest.mark.slow
def test_ddp_two_processes_default_task_reward_rises(tmp_path):
    out = tmp_path / "ddp"
    launch("ddp", out, timeout=400)
    store = AttributionStore(out / "attribution")
    tables = check_store(out, rounds=len(store.rounds()), per_process=32, drop_fraction=1.0)
    assert len(tables) == 60
    rewards = torch.tensor([store.read_metrics(r)["objective/scores"] for r in store.rounds()])
    # the default task reaches its plateau within 10-20 rounds, so compare the start with the end
    first, last = rewards[:3].mean(), rewards[-15:].mean()
    assert last > first + 0.08, rewards.tolist()
