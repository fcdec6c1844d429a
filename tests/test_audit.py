"""The attribution store and `rlhf-influence audit` on stores written with known contents."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_manifest import toy_manifest

from rlhf_influence.audit import find_jumps
from rlhf_influence.cli import main
from rlhf_influence.store import AttributionStore

REWARDS = [0.0, 0.05, 0.02, 0.9, 0.88, 0.93, 0.91]  # one clear jump, at round 4


def make_run(tmp_path: Path, rewards=REWARDS, n: int = 6) -> Path:
    run = tmp_path / "run"
    store = AttributionStore(run / "attribution")
    store.write_manifest(toy_manifest(target="heldout_return", num_processes=1))
    for k, mean in enumerate(rewards, start=1):
        influence = [(i - 2.5) * k for i in range(n)]  # record n-1 most helpful, record 0 most harmful
        store.write_round(
            k,
            {
                "record": list(range(n)),
                "prompt": [f"prompt {k}.{i}" for i in range(n)],
                "response": [f"response {k}.{i}" for i in range(n)],
                "reward": [mean] * n,
                "influence": influence,
                "kept": [x >= 0 for x in influence],
            },
            {"objective/scores": mean},
        )
    return run


def rewrite_records(run: Path, round_index: int, change) -> None:
    """Damage a round's records table in place (parses, but wrong)."""
    path = run / "attribution" / f"round_{round_index:06d}" / "records.parquet"
    pq.write_table(change(pq.read_table(path)), path)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_find_jumps_rule():
    deltas = [REWARDS[i + 1] - REWARDS[i] for i in range(len(REWARDS) - 1)]
    mean = sum(deltas) / len(deltas)
    std = (sum((d - mean) ** 2 for d in deltas) / len(deltas)) ** 0.5
    expected = [(k + 1, d) for k, d in enumerate(deltas) if d > 1.5 * std]
    assert find_jumps(REWARDS) == expected == [(3, pytest.approx(0.88))]
    assert find_jumps(REWARDS, min_delta=1.0) == []
    assert find_jumps([0.3]) == []


def test_audit_json_shape_and_attribution(tmp_path, capsys):
    run = make_run(tmp_path)
    before = tree_digest(run)
    assert main(["audit", str(run), "--json", "--top", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in report["rounds"]] == list(range(1, 8))
    assert set(report["rounds"][0]) >= {"round", "mean_reward", "kept", "dropped"}
    assert report["rounds"][0]["kept"] == 3 and report["rounds"][0]["dropped"] == 3
    (jump,) = report["jumps"]
    assert jump["round"] == 4 and jump["attributed_round"] == 3
    assert jump["reward_delta"] == pytest.approx(0.88)
    top = jump["top_records"]
    assert [r["prompt"] for r in top] == ["prompt 3.5", "prompt 3.4"]
    assert set(top[0]) >= {"prompt", "response", "reward", "influence"}
    assert [r["prompt"] for r in jump["bottom_records"]] == ["prompt 3.0", "prompt 3.1"]
    # no stored gradients in this run: the best responses cannot be traced, and it says so
    assert jump["best_responses"]["note"].startswith("not available: the run stored no gradients")
    assert tree_digest(run) == before  # an audit never modifies the store


def test_audit_table_and_attribution_folder(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["audit", str(run / "attribution")]) == 0
    out = capsys.readouterr().out
    assert "round 4" in out and "driven by round 3" in out and "response 3.5" in out


def test_half_written_round_is_ignored_and_a_resume_appends(tmp_path, capsys):
    run = make_run(tmp_path, rewards=REWARDS[:3])
    half = run / "attribution" / ".round_000004.tmp-123-456"  # what a kill mid-write leaves
    half.mkdir()
    (half / "records.parquet").write_bytes(b"PAR1 truncated")
    store = AttributionStore.open(run)
    assert store.rounds() == [1, 2, 3]
    assert main(["audit", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["rounds"]) == 3
    assert "note: ignoring 1 half-written round(s) of a killed run: .round_000004.tmp-123-456" in err
    assert half.is_dir()  # a reader reports it, only a writer removes it
    assert store.remove_stale_temporaries() == [half.name] and not half.exists()
    store.write_round(4, {"record": [0], "prompt": ["p"], "response": ["r"], "reward": [1.0],
                          "influence": [0.1], "kept": [True]}, {})  # fmt: skip
    assert store.rounds() == [1, 2, 3, 4]
    with pytest.raises(FileExistsError, match="round 4 is already in the store"):
        store.write_round(4, {"record": [0]}, {})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: None, "is not an rlhf-influence run"),
        (lambda run: (run / "attribution" / "round_000002" / "records.parquet").unlink(), "round 2: cannot read"),
        (lambda run: (run / "attribution" / "round_000002" / "records.parquet").write_bytes(b"PAR1xx"), "round 2: cannot read"),
        (lambda run: (run / "attribution" / "manifest.json").write_text(json.dumps({"format_version": 99})), "format version 99"),
        (lambda run: (run / "attribution" / "manifest.json").write_text("[1, 2]"), "manifest.json is damaged: a JSON list, not an object"),
        (lambda run: rewrite_records(run, 2, lambda t: t.slice(0, 0)), "holds no records"),
        (lambda run: rewrite_records(run, 2, lambda t: t.drop_columns(["kept"])), "lacks the column 'kept'"),
        (lambda run: rewrite_records(run, 2, lambda t: t.set_column(3, "reward", pa.array(["high"] * 6))),
         "column 'reward' holds string, not floats"),
        (lambda run: rewrite_records(run, 2, lambda t: t.set_column(3, "reward", pa.array([None] * 6, pa.float64()))),
         "column 'reward' has 6 empty value(s)"),
        (lambda run: shutil.rmtree(run / "attribution" / "round_000003"),
         "round(s) 3 missing among rounds 1..7"),
    ],
)  # fmt: skip
def test_bad_runs_get_one_line_errors(tmp_path, damage, message):
    if message == "is not an rlhf-influence run":
        run = tmp_path / "not-a-run"
        run.mkdir()
    else:
        run = make_run(tmp_path)
        damage(run)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_influence.cli", "audit", str(run)], capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_missing_directory(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_diagnose_counts_wrong_sign_advantages(tmp_path, capsys):
    run = tmp_path / "run"
    store = AttributionStore(run / "attribution")
    store.write_manifest(toy_manifest())
    # 10 records; mean reward 0.5. Influence ranks records 0 (most harmful) .. 9 (most helpful).
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # records 0 and 1 (bottom 2) have advantages against their centred reward; 8, 9 (top 2) agree.
    advantages = [-1.0, 2.0, 0.5, -0.5, -0.3, 0.3, 0.2, -0.2, 1.0, -1.0]
    store.write_round(1, {"record": list(range(10)), "reward": rewards, "advantage_mean": advantages,
                          "influence": [float(i) for i in range(10)], "kept": [True] * 10,
                          "prompt": ["p"] * 10, "response": ["r"] * 10}, {})  # fmt: skip
    assert main(["diagnose", str(run), "--bottom-fraction", "0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (r,) = out["rounds"]
    assert r["bottom_wrong_sign"] == 1.0 and r["top_wrong_sign"] == 0.0
    wrong = sum((a > 0) != (w - 0.5 > 0) for a, w in zip(advantages, rewards, strict=True))
    assert r["all_wrong_sign"] == pytest.approx(wrong / 10)
    assert out["overall"]["bottom_wrong_sign"] == 1.0
    with pytest.raises(SystemExit) as exit_info:  # refused by the argument's type, before the store is read
        main(["diagnose", str(run), "--bottom-fraction", "0.9"])
    assert exit_info.value.code == 2
    from rlhf_influence.audit.analyses import diagnose
    from rlhf_influence.store import StoreError

    with pytest.raises(
        StoreError, match=r"must be in \(0, 0.5\], got 0.9"
    ):  # and by the library, for API users
        diagnose(run, bottom_fraction=0.9)


def test_store_files_honour_the_umask(tmp_path):
    """safetensors writes 0600 whatever the umask; a shared run must be readable by the group."""
    import os
    import stat

    import torch

    previous = os.umask(0o022)
    try:
        store = AttributionStore(tmp_path / "attribution")
        store.write_manifest(toy_manifest(target="heldout_return"))
        final = store.write_round(1, {"record": [0]}, {}, {"adapter": {"w": torch.zeros(2)}})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [final, *final.iterdir()]}
    assert modes == {
        final.name: 0o755,
        "records.parquet": 0o644,
        "metrics.json": 0o644,
        "adapter.safetensors": 0o644,
    }


def test_terminal_text_shows_control_characters(capsys):
    from types import SimpleNamespace

    from rlhf_influence.cli import print_records, terminal_text

    assert terminal_text("a\x1b[31mred\nnext\x9b") == "a\\x1b[31mred\\nnext\\x9b"
    record = SimpleNamespace(
        influence=1.0, reward=0.5, kept=True, prompt="p\x1b]0;pwned\x07", response="r\x1b[2J"
    )
    print_records("records", [("top", [record], "green")])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b]0;pwned" in out and "\\x1b[2J" in out


def test_damaged_metrics_and_model_files(tmp_path):
    from rlhf_influence.store import StoreError

    run = make_run(tmp_path)
    store = AttributionStore.open(run)
    (store.round_dir(2) / "metrics.json").write_text("[]")
    with pytest.raises(StoreError, match=r"metrics\.json is damaged: a JSON list"):
        store.read_metrics(2)
    with pytest.raises(StoreError, match="keeps no model files"):
        store.read_model_info()
    (store.path / "model.json").write_text("{broken")
    with pytest.raises(StoreError, match=r"cannot read .*model\.json"):
        store.read_model_info()
    (store.path / "model.json").write_text(json.dumps({"base_model_saved": "yes"}))
    with pytest.raises(StoreError, match=r"model\.json is damaged"):
        store.read_model_info()
