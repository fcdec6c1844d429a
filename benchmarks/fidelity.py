"""How faithful are projected influence scores, and do the top records matter counterfactually?

1. Projection fidelity: on a trained run's stored rounds (records, round-start adapter), each
   record's exact influence on a log-prob target against its projected estimate at several
   projection dims (several projection seeds each): Spearman correlation and the overlap of the
   top 10% records.
2. Counterfactual: for several rounds, re-run the round's PPO policy update without the top 10%
   records by influence on that target, and without 10% random records, and compare the change
   in the target (rlhf_influence.audit.intervention). If attribution is right, removing the top
   records lowers the target clearly more than removing random ones.
3. The same counterfactual for the return target IIF filters against: the held-out samples
   each round drew, with their advantages, as stored in the round (target.safetensors).

    python recipes/ppo_iif.py --output_dir runs/fidelity          # any run (the default task here)
    python benchmarks/fidelity.py runs/fidelity --rounds 5 10 20 40 --dims 8 16 32 64 128
    # or let it train the run first: the default task with a 256-wide policy, so that every
    # adapter side is wider than the smaller dims and the projection is really tested
    python benchmarks/fidelity.py runs/fidelity256 --train-width 256 --rounds 5 10 20 40
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from scipy.stats import binomtest, spearmanr

from rlhf_influence import RandomProjector, SketchedProjector
from rlhf_influence.audit.intervention import InterventionResult, RoundReplay, intervene, intervene_return
from rlhf_influence.audit.rescore import SnapshotScorer
from rlhf_influence.engine.targets import LogProbTarget


def projection_fidelity(
    scorer: SnapshotScorer,
    round_index: int,
    behaviour: tuple[str, str],
    dims,
    seeds,
    sketch_dims=(),
    side_dim=64,
) -> dict:
    """Exact influence at the round's snapshot against projected estimates from the same factors:
    per-side projections at each of ``dims`` (keys ``"side <dim>"``), and per-side ``side_dim``
    folded by the sketch to each of ``sketch_dims`` (``"sketch <dim>"``); several seeds each. Also
    ``"stored"``: the round's stored vectors as ``score`` reads them (one draw, the run's seed).
    The target is log p(response | prompt) of ``behaviour = (prompt, response)``."""
    prompt, response = behaviour
    target = LogProbTarget.from_text(scorer.tokenizer, [prompt], [response])
    target.temperature = scorer.temperature
    target.positions_from_mask = scorer.positions_from_mask
    replay = RoundReplay(scorer, round_index)
    kinds = [(f"side {d}", lambda s, d=d: RandomProjector(d, seed=s)) for d in dims]
    kinds += [
        (f"sketch {d}", lambda s, d=d: SketchedProjector(d, side_dim=side_dim, seed=s)) for d in sketch_dims
    ]
    projectors = [make(seed) for _, make in kinds for seed in seeds]
    exact, *projected_all = replay.scores(target, projectors)
    stored = torch.tensor([r.influence for r in scorer.score(round_index, prompt, response)])
    k = max(1, len(exact) // 10)
    top_exact = set(torch.argsort(exact, descending=True)[:k].tolist())

    def agreement(estimates: list[torch.Tensor]) -> tuple[list[float], list[float]]:
        rhos = [float(spearmanr(exact.numpy(), e.numpy()).statistic) for e in estimates]
        overlaps = [
            len(top_exact & set(torch.argsort(e, descending=True)[:k].tolist())) / k for e in estimates
        ]
        return rhos, overlaps

    out = {}
    for i, (name, make) in enumerate(kinds):
        rhos, overlaps = agreement(projected_all[i * len(seeds) : (i + 1) * len(seeds)])
        out[name] = {
            "spearman": rhos,
            "top10_overlap": overlaps,
            "features": make(0).output_size(scorer.layout),
        }
    rhos, overlaps = agreement([stored])
    out["stored"] = {
        "spearman": rhos,
        "top10_overlap": overlaps,
        "features": scorer.projector.output_size(scorer.layout),
    }
    return out


def train_run(out: Path, width: int, rounds: int, seed: int = 0) -> None:
    """The default task's settings (sampling temperature 0.7, lr 2e-3), policy and value model
    ``width`` wide."""
    from rlhf_influence import IIFPPOConfig, IIFPPOTrainer
    from rlhf_influence.tasks.sentiment import HELDOUT_PROMPTS, TRAINING, build

    task = build(seed=seed, hidden=width)
    settings = {
        **TRAINING,
        "learning_rate": 2e-3,  # the default 5e-3 is a large step for a 256-wide policy
        "temperature": 0.7,  # PPOConfig's default, which the published fidelity results were measured with
    }
    args = IIFPPOConfig(
        **settings, output_dir=str(out), total_episodes=settings["per_device_train_batch_size"] * rounds,
        iif_num_heldout_prompts=HELDOUT_PROMPTS, report_to="none", save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=False, seed=seed, disable_tqdm=True,
    )  # fmt: skip
    trainer = IIFPPOTrainer(
        args=args, processing_class=task.tokenizer, model=task.policy, ref_model=None, reward_model=task.reward,
        train_dataset=task.train_dataset.select_columns(["input_ids"]), value_model=task.value_model,
        target_dataset=task.heldout_dataset.select_columns(["input_ids"]), peft_config=task.lora_config,
    )  # fmt: skip
    trainer.train()
    print(f"trained {rounds} rounds of the default task at width {width} into {out}\n")


def counterfactual_table(results: dict[int, InterventionResult]) -> dict[int, dict]:
    """Print one row per round and the tally; the results as plain dicts."""
    print("| round | at start | after all records | without top 10% | without random 10% | top - random |")
    print("|---|---|---|---|---|---|")
    for r, x in results.items():
        print(f"| {r} | {x.target_before:+.4f} | {x.target_all:+.4f} | {x.target_without_top:+.4f} "
              f"| {x.target_without_random:+.4f} | {x.target_without_top - x.target_without_random:+.4f} |")  # fmt: skip
    worse = [x.target_without_top < x.target_without_random for x in results.values()]
    below_all = [x.target_without_top < x.target_all for x in results.values()]
    gaps = [x.target_without_top - x.target_without_random for x in results.values()]
    # one-sided sign test: H0 "removing the top records is no worse for the target than removing random ones"
    p_value = binomtest(sum(worse), len(worse), 0.5, alternative="greater").pvalue
    print(f"without the top records the target ends lower than without random ones in {sum(worse)}/{len(worse)} "
          f"rounds (sign test p = {p_value:.3g}; median top - random {statistics.median(gaps):+.4f}), lower than "
          f"with all records in {sum(below_all)}/{len(below_all)} rounds")  # fmt: skip
    return {r: x.__dict__ for r, x in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run directory with stored rounds")
    parser.add_argument("--rounds", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="per-side dims")
    parser.add_argument(
        "--sketch-dims",
        type=int,
        nargs="*",
        default=[],
        help="sketch sizes over the per-side dim 64 (the store's)",
    )
    parser.add_argument("--skip-counterfactual", action="store_true", help="only the projection fidelity")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompt", default="the movie was")
    parser.add_argument("--response", default="great fun and lovely")
    parser.add_argument("--random-draws", type=int, default=5, help="random removals per round (averaged)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--train-width",
        type=int,
        help="first train RUN (which must not exist): the embedded default task with a policy of this "
        "hidden width, for max(--rounds) rounds, gradients stored at the default dim",
    )
    args = parser.parse_args(argv)
    if args.train_width:
        if args.run.exists():
            parser.error(f"{args.run} exists; --train-width trains a new run there")
        train_run(args.run, args.train_width, max(args.rounds))

    scorer = SnapshotScorer(args.run)
    print(f"target: log p({args.response!r} | {args.prompt!r}); rounds {args.rounds}; {scorer.layout.num_params} "
          f"LoRA parameters\n")  # fmt: skip
    behaviour = (args.prompt, args.response)
    fidelity = {
        r: projection_fidelity(scorer, r, behaviour, args.dims, args.seeds, args.sketch_dims)
        for r in args.rounds
    }
    print(f"stored: {scorer.spec}\n")
    print("| projection | features per record | Spearman (median [min, max]) | median over rounds of the per-round "
          "median | top-10% overlap |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in fidelity[args.rounds[0]]:
        rhos = [x for r in args.rounds for x in fidelity[r][name]["spearman"]]
        per_round = statistics.median(statistics.median(fidelity[r][name]["spearman"]) for r in args.rounds)
        overlaps = [x for r in args.rounds for x in fidelity[r][name]["top10_overlap"]]
        features = fidelity[args.rounds[0]][name]["features"]
        print(f"| {name} | {features} | {statistics.median(rhos):.3f} [{min(rhos):.3f}, {max(rhos):.3f}] "
              f"| {per_round:.3f} | {statistics.median(overlaps):.2f} [{min(overlaps):.2f}, {max(overlaps):.2f}] |")  # fmt: skip
    if args.skip_counterfactual:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"fidelity": fidelity}, indent=2))
        return

    print(f"\ncounterfactual, target log p({args.response!r} | {args.prompt!r}):")
    counterfactual = counterfactual_table(
        {
            r: intervene(args.run, r, args.prompt, args.response, random_draws=args.random_draws)
            for r in args.rounds
        }
    )
    print("\ncounterfactual, target: each round's held-out return target (what IIF filtered against):")
    counterfactual_return = counterfactual_table(
        {r: intervene_return(args.run, r, random_draws=args.random_draws) for r in args.rounds}
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results = {
            "fidelity": fidelity,
            "counterfactual": counterfactual,
            "counterfactual_return": counterfactual_return,
        }
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
