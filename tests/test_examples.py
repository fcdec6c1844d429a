"""The example and the engine benchmark run end to end on tiny settings, so neither rots."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_engine_benchmark_smoke():
    out = run("benchmarks/bench_engine.py", "--batch-sizes", "4", "--seq-lens", "8", "--hidden", "32",
              "--layers", "1", "--vocab", "64", "--repeats", "1")  # fmt: skip
    for method in ("floor", "exact", "projected", "scoring", "loop", "vmap"):
        assert method in out
    assert "cannot run" not in out


def test_attribute_batch_example():
    out = run("examples/attribute_batch.py")
    assert "max relative error vs per-record autograd" in out


def test_iif_vs_ppo_benchmark_smoke(tmp_path):
    out = run("benchmarks/iif_vs_ppo.py", "--arms", "ppo", "random", "--seeds", "0", "--rounds", "2",
              "--parallel", "1", "--out", str(tmp_path))  # fmt: skip
    assert "threshold (PPO's final reward" in out and "| random |" in out
    assert (tmp_path / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_iif_vs_grpo_benchmark_smoke(tmp_path, algorithm):
    out = run("benchmarks/iif_vs_grpo.py", "--algorithm", algorithm, "--task", "sentiment", "--arms", algorithm, "iif",
              "--seeds", "0", "--rounds", "2", "--parallel", "1", "--out", str(tmp_path))  # fmt: skip
    assert f"threshold ({algorithm.upper()}'s final reward" in out and "| iif |" in out
    assert (tmp_path / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_frontier_benchmark_smoke(tmp_path):
    out = run("benchmarks/frontier.py", "--task", "sentiment", "--seeds", "0", "--rounds", "2", "--kl", "adaptive",
              "--parallel", "2", "--kl_levels", "0", "--out", str(tmp_path))  # fmt: skip
    assert "sentiment, adaptive KL coefficient: 1 seeds, 2 rounds" in out and "| random filter |" in out
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "Reward at KL levels" in out and "| 0 | " in out  # every run starts at KL 0
    import json

    levels = json.loads((tmp_path / "summary.json").read_text())["adaptive"]["reward_at_kl_levels"]
    assert all(v is not None for arm in levels["0.0"].values() for v in arm.values())


def test_checkpoint_cost_benchmark_smoke(tmp_path):
    out = run("benchmarks/checkpoint_cost.py", "--task", "sentiment", "--rounds", "2", "--algorithms", "ppo",
              "--out", str(tmp_path))  # fmt: skip
    assert "ppo on sentiment: checkpoint" in out and (tmp_path / "results.json").is_file()


def test_overhead_benchmark_smoke(tmp_path):
    out = run("benchmarks/overhead.py", "--rounds", "2", "--out", str(tmp_path))
    for arm in (
        "| ppo |",
        "| iif_round |",
        "| iif_round_separate |",
        "| iif_epoch |",
        "| iif_round_buffer |",
    ):
        assert arm in out
    assert (tmp_path / "summary.json").is_file()


def test_fidelity_benchmark_smoke(tmp_path):
    run_dir = tmp_path / "run"  # trained by the script itself, on a 32-wide policy
    out = run("benchmarks/fidelity.py", str(run_dir), "--train-width", "32", "--rounds", "2", "--dims", "8", "64",
              "--seeds", "0")  # fmt: skip
    assert "held-out return target" in out
    assert (
        "| side 8 |" in out
        and "| side 64 |" in out
        and "| stored |" in out
        and "rounds" in out.splitlines()[-1]
    )


def test_reviews_rounds_script_smoke(tmp_path):
    """The script the real-LM time-per-round figures come from, on the tiny task (--smoke)."""
    import json

    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "RUNS": str(tmp_path / "runs"),
        "PYTHON": sys.executable,
    }
    result = subprocess.run(["bash", "benchmarks/reviews_rounds.sh", "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for arm in ("| ppo |", "| iif_round |", "| iif_epoch |"):
        assert arm in result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["runs"]["ppo"]["rounds"] == 2
    assert summary["runs"]["iif_round"]["kept_fraction"] < 1.0  # IIF filtered, PPO did not
    assert summary["runs"]["ppo"]["kept_fraction"] == 1.0


@pytest.mark.slow
def test_gpu_check_script_smoke(tmp_path):
    """The one prepared GPU run (benchmarks/gpu_check.sh), every step on the tiny task (--smoke)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.log").read_text()
    for step in ("env", "engine", "overhead", "bench", "efficacy"):
        assert f"== {step}: ok" in summary, summary
    assert "| float32 |" in summary and "| iif_round |" in summary and "| random_round |" in summary
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "results/engine_check.json" in names and "results/efficacy/table.md" in names
    assert not any("/tokenizer/" in name for name in names)


def test_report_scale_benchmark_smoke(tmp_path):
    out = run("benchmarks/report_scale.py", "--rounds", "6", "--records", "8", "--out", str(tmp_path))
    assert "6 rounds x 8 records" in out and "report --responses 0:" in out
    assert (tmp_path / "result.json").is_file()
