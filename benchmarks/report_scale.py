"""Do `audit` and `report` stay fast and small on a long run? A synthetic store of the real LM's shape.

Writes a store of ROUNDS rounds of RECORDS records each (default 300 x 256, a long run of the
reviews task at a GPU's batch size) through the store's own writer: review openings as prompts,
responses of the reviews task's length (24 tokens, about 120 characters), a rising reward with
noise, advantages, influence scores and p=1 kept flags, and each round's TRL metrics (reward,
KL). No gradients or snapshots (the charts and tables read none). Then times, each in a fresh
process, `rlhf-influence audit --json --responses 0` and `rlhf-influence report --responses 0`,
and reports the page's size. Tracing a jump's best responses (`--responses`, on by default)
costs one policy rebuild plus one backward per jump, whatever the run's length: time it on a
real run with --real-run.

    python benchmarks/report_scale.py                       # 300 x 256, about a minute
    python benchmarks/report_scale.py --rounds 30 --records 16 --real-run runs/reviews_cpu/iif_round
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_store(path: Path, rounds: int, records: int, seed: int = 0) -> None:
    from rlhf_influence.store import AttributionStore, RunManifest
    from rlhf_influence.tasks.reviews import review_openings
    from rlhf_influence.tasks.toy import TOY_WORDS

    rng = random.Random(seed)
    prompts = review_openings()[0]
    words = TOY_WORDS.split() if isinstance(TOY_WORDS, str) else list(TOY_WORDS)
    store = AttributionStore(path / "attribution")
    store.write_manifest(RunManifest(schedule="round", drop_fraction=1.0, min_keep_fraction=0.1, projection_dim=0,
                                     projection_seed=0, num_processes=1, records_per_round=records,
                                     lora_parameters=0, lora_adapters=0))  # fmt: skip
    for k in range(1, rounds + 1):
        level = 0.6 * (1 - 2.718 ** (-k / (rounds / 4)))
        reward = [max(-1.0, min(1.0, rng.gauss(level, 0.4))) for _ in range(records)]
        mean = sum(reward) / records
        advantage_mean = [r - mean + rng.gauss(0, 0.2) for r in reward]
        influence = [rng.gauss(0, 0.05) for _ in range(records)]
        table = {
            "record": list(range(records)),
            "process": [0] * records,
            "prompt": [rng.choice(prompts) for _ in range(records)],
            "response": [" " + " ".join(rng.choice(words) for _ in range(22)) for _ in range(records)],
            "reward": reward,
            "advantage_mean": advantage_mean,
            "advantage_last": [a * 1.5 + rng.gauss(0, 0.3) for a in advantage_mean],
            "logprob": [rng.gauss(-45, 5) for _ in range(records)],
            "influence": influence,
            "rank": sorted(range(records), key=lambda i: -influence[i]),
            "kept": [v > 0 for v in influence],
        }
        kl = 0.15 * k
        store.write_round(k, table, {"objective/scores": mean, "objective/kl": kl, "iif/kept_fraction": 0.5})


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rlhf_influence.cli", *argv], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"rlhf-influence {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--real-run", type=Path, help="also time --responses 4 against 0 on this real run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "report_scale")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"rounds": args.rounds, "records": args.records}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        start = time.perf_counter()
        write_store(run, args.rounds, args.records)
        result["write_seconds"] = time.perf_counter() - start
        result["store_mib"] = sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) / 2**20
        result["audit_seconds"], out = timed(["audit", str(run), "--json", "--responses", "0"])
        result["jumps"] = len(json.loads(out)["jumps"])
        page = Path(tmp) / "report.html"
        result["report_seconds"], _ = timed(["report", str(run), "-o", str(page), "--responses", "0"])
        result["report_mib"] = page.stat().st_size / 2**20
    if args.real_run:
        for n in (0, 4):
            result[f"real_audit_responses_{n}_seconds"], _ = timed(
                ["audit", str(args.real_run), "--json", "--responses", str(n)]
            )
    lines = [
        f"{args.rounds} rounds x {args.records} records ({args.rounds * args.records} records, store "
        f"{result['store_mib']:.0f} MiB without gradients): written in {result['write_seconds']:.1f} s",
        f"audit --json --responses 0: {result['audit_seconds']:.1f} s ({result['jumps']} jumps)",
        f"report --responses 0: {result['report_seconds']:.1f} s, {result['report_mib']:.1f} MiB",
    ]
    if args.real_run:
        lines.append(
            f"{args.real_run}: audit --responses 0 {result['real_audit_responses_0_seconds']:.1f} s, "
            f"--responses 4 {result['real_audit_responses_4_seconds']:.1f} s"
        )
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    (args.out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
