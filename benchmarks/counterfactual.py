"""Counterfactual validity of influence on a stored run: does a record's score predict what the
round's update does to the expected reward, judged on a large, independent sample?

For each chosen round of a run stored with ``--iif_store_optimizer_state true`` (and p=0, so every
record was trained on), at the round's snapshot:

1. **Samples.** A *reference*: ``--reference`` training-split prompts not in the round, one fresh
   response each, and *score targets* from the held-out split (``--heldout-prompts`` prompts x
   ``--samples`` responses each): ``fresh16`` (the first response to 16 prompts), ``fresh64`` (the
   first to 64), ``fresh128`` (the first two), ``fresh256`` (four). ``buffer`` is the round's own
   records with their per-token advantages (the buffer target). Each fresh set's surrogate is
   f(theta) = mean_i A_i log pi(y_i | x_i) with A the set's rewards standardised (a REINFORCE-with-baseline estimate of the expected
   reward's gradient at the snapshot); ``stored`` is the round's own target as the trainer built it
   (its held-out samples, 16 on the reviews task, with last-token GAE advantages), and ``oracle``
   scores against the reference itself (not independent of the judge: the ceiling of what the
   re-runs can show).
2. **Scores** of the round's records on every target, four ways: ``raw`` (today's <grad f, -grad
   loss_i>), ``adam`` (the record's gradient divided by sqrt(v_hat) + eps, Adam's second moment at
   the round start, as LESS and Bergson precondition), ``cosine`` (raw over the record's gradient
   norm, LESS), ``adam_cosine``.
3. **Re-runs** of the round's update from the snapshot and Adam's stored moments (the audit's
   ``RoundReplay``): on all records; without the top ``--remove`` records by each variant's score and
   without its bottom ``--remove``; without ``--remove`` random records (``--draws`` draws); and, on the
   LDS rounds, on ``--subsets`` random half-subsets. Each re-run's effect on every target is
   measured to first order, grad f(theta_0) . (theta_after - theta_0) (the reference's exact change
   is checked on ``--exact-rounds``).

Outputs one JSON per round under ``--out`` as it goes (a re-started job skips finished rounds);
``summarise`` turns them into the tables in benchmarks/README.md.

    python benchmarks/counterfactual.py analyse --run RUN --task reviews --rounds 2 4 6 --out DIR
    python benchmarks/counterfactual.py summarise --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rlhf_influence.audit.intervention import RoundReplay
from rlhf_influence.audit.rescore import SnapshotScorer
from rlhf_influence.engine.capture import capture_factors
from rlhf_influence.engine.gradients import target_gradients
from rlhf_influence.engine.targets import ReturnTarget, TokenWeightedLogProb
from rlhf_influence.tasks import get_task

SCORES = ("raw", "adam", "cosine", "adam_cosine")
TARGETS = ("stored", "buffer", "fresh16", "fresh64", "fresh128", "fresh256", "oracle")
SIGN_TEST_VARIANTS = [(s, t) for s in SCORES for t in TARGETS]


# ---------------------------------------------------------------------------------------------- samples
@torch.no_grad()
def sample(policy, tokenizer, prompts: list[list[int]], temperature: float, length: int, seed: int, chunk: int = 64):
    """One sampled response per prompt (token ids) from the policy as it is, in chunks."""
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    rows = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        width = max(len(p) for p in part)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in part])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in part])[:, None]).long()
        out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                              top_p=1.0, max_new_tokens=length, min_new_tokens=length, pad_token_id=pad)  # fmt: skip
        rows += [(p, out[i, width:].tolist()) for i, p in enumerate(part)]
    return rows


def layout_pairs(rows, pad: int):
    """Left-padded prompt + response ``input_ids, attention_mask, response_mask``."""
    width = max(len(p) + len(r) for p, r in rows)
    m = len(rows)
    input_ids = torch.full((m, width), pad, dtype=torch.long)
    attention = torch.zeros(m, width, dtype=torch.long)
    response = torch.zeros(m, width, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        seq = p + r
        input_ids[i, width - len(seq) :] = torch.tensor(seq)
        attention[i, width - len(seq) :] = 1
        response[i, width - len(r) :] = True
    return input_ids, attention, response


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-8)


def surrogate_gradient(policy, layout, rows, weights: np.ndarray, pad: int, temperature: float, chunk: int = 16):
    """grad of sum_i weights_i log pi(y_i | x_i) over the trainable LoRA weights, ``[D]``."""
    total = None
    for start in range(0, len(rows), chunk):
        ids, att, resp = layout_pairs(rows[start : start + chunk], pad)
        w = torch.as_tensor(weights[start : start + chunk] * len(ids), dtype=torch.float32)
        target = ReturnTarget(ids, att, resp, w, temperature=temperature)  # mean over its rows of w_i log pi
        g = capture_factors(policy, target, layout=layout, per_record=False).total_gradient()
        total = g if total is None else total + g
    return total


def weighted_gradients(policy, layout, rows, weights: np.ndarray, pad: int, temperature: float, chunk: int = 16):
    """``[k, D]``: row j is grad of sum_i weights[i, j] log pi(y_i | x_i), from one forward and
    backward per chunk (the rows' own gradients, combined)."""
    total = torch.zeros(weights.shape[1], layout.num_params)
    for start in range(0, len(rows), chunk):
        ids, att, resp = layout_pairs(rows[start : start + chunk], pad)
        logprob = TokenWeightedLogProb(ids, att, resp.float(), temperature)  # [m]: each row's log pi(y | x)
        per_row = capture_factors(policy, logprob, layout=layout).gradients(None)  # [m, D]
        total += torch.as_tensor(weights[start : start + chunk].T, dtype=per_row.dtype) @ per_row
    return total


@torch.no_grad()
def surrogate_value(policy, rows, weights: np.ndarray, pad: int, temperature: float, chunk: int = 32) -> float:
    value = 0.0
    for start in range(0, len(rows), chunk):
        ids, att, resp = layout_pairs(rows[start : start + chunk], pad)
        w = torch.as_tensor(weights[start : start + chunk] * len(ids), dtype=torch.float32)
        value += float(ReturnTarget(ids, att, resp, w, temperature=temperature)(policy).sum())
    return value


# ---------------------------------------------------------------------------------------------- one round
def flat_trainable(policy) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in policy.parameters() if p.requires_grad])


def analyse_round(replay: RoundReplay, task, args, round_index: int) -> dict:
    scorer = replay.scorer
    policy, tokenizer, layout = scorer.policy, scorer.tokenizer, scorer.layout
    pad, temperature = tokenizer.pad_token_id, scorer.temperature
    spec = get_task(args.task)
    length = spec.settings_for("ppo")["response_length"]
    t0 = time.time()
    scorer.load_round(round_index)
    theta0 = flat_trainable(policy)

    # 1. samples at the snapshot: the reference (training-split prompts not in the round) and the score targets
    rng = np.random.default_rng(10_000 + round_index)
    in_round = set(scorer.store.read_records(round_index).to_pydict()["prompt"])
    train_rows = [r for r in task.train_dataset if r["prompt"].strip() not in {p.strip() for p in in_round}]
    ref_prompts = [train_rows[i] for i in rng.choice(len(train_rows), size=args.reference, replace=args.reference > len(train_rows))]
    heldout = [task.heldout_dataset[int(i)] for i in rng.choice(len(task.heldout_dataset), size=args.heldout_prompts,
                                                                replace=args.heldout_prompts > len(task.heldout_dataset))]  # fmt: skip
    with torch.no_grad():
        ref_rows = sample(policy, tokenizer, [r["input_ids"] for r in ref_prompts], temperature, length,
                          seed=20_000 + round_index)  # fmt: skip
        fresh_rows = []
        for s in range(args.samples):  # response s to every held-out prompt
            fresh_rows += sample(policy, tokenizer, [r["input_ids"] for r in heldout], temperature, length,
                                 seed=30_000 + 100 * round_index + s)  # fmt: skip

    def rewards(prompt_rows, rows):
        texts = [tokenizer.decode(r, skip_special_tokens=True) for _, r in rows]
        return np.asarray(task.reward([p["prompt"] for p in prompt_rows], texts), dtype=np.float64)

    ref_reward = rewards(ref_prompts, ref_rows)
    fresh_reward = rewards(heldout * args.samples, fresh_rows)
    k = args.heldout_prompts
    sets = {"fresh16": list(range(16)), "fresh64": list(range(k)), "fresh128": list(range(2 * k)),
            "fresh256": list(range(4 * k))}  # fmt: skip
    t_sampled = time.time()

    # 2. target gradients at the snapshot
    ref_weights = standardised(ref_reward) / len(ref_rows)
    grads = {"oracle": surrogate_gradient(policy, layout, ref_rows, ref_weights, pad, temperature)}
    weights = np.zeros((len(fresh_rows), len(sets)))
    for j, idx in enumerate(sets.values()):
        weights[idx, j] = standardised(fresh_reward[idx]) / len(idx)
    for name, g in zip(sets, weighted_gradients(policy, layout, fresh_rows, weights, pad, temperature), strict=True):
        grads[name] = g
    grads["stored"] = target_gradients(policy, replay.return_target(), layout=layout)
    records = replay.records  # the buffer target: the round's own records, per-token advantages
    buffer = ReturnTarget.from_buffer(records.input_ids, records.attention_mask, records.response_mask,
                                      records.advantages, temperature)  # fmt: skip
    buffer.positions_from_mask = records.positions_from_mask
    grads["buffer"] = target_gradients(policy, buffer, layout=layout)
    target_matrix = torch.stack([grads[t] for t in TARGETS])  # [targets, D]

    # the records' exact gradients and Adam's preconditioner at the round start
    record_grads = exact_record_gradients(replay)
    precondition = replay.adam_preconditioner()
    step = float(replay.optimizer_state()["step"][0])
    scores = {}
    raw = -(record_grads @ target_matrix.T)  # [N, targets]
    norms = record_grads.norm(dim=1, keepdim=True)
    scores["raw"], scores["cosine"] = raw, raw / norms
    if precondition is not None:
        adam_grads = record_grads * precondition
        scores["adam"] = -(adam_grads @ target_matrix.T)
        scores["adam_cosine"] = scores["adam"] / adam_grads.norm(dim=1, keepdim=True)
    t_scored = time.time()

    # target quality: how well each score target's (preconditioned) gradient aligns with the reference's
    alignment = {}
    for t in TARGETS[:-1]:
        alignment[f"raw/{t}"] = float(torch.nn.functional.cosine_similarity(grads[t], grads["oracle"], dim=0))
        if precondition is not None:
            a = torch.nn.functional.cosine_similarity(grads[t] * precondition.sqrt(), grads["oracle"] * precondition.sqrt(), dim=0)
            alignment[f"adam/{t}"] = float(a)

    # 3. re-runs: each's first-order change of every target, cached by the set of removed records
    n = len(replay)
    everyone = np.arange(n)
    cache: dict[tuple, list[float]] = {}

    before = surrogate_value(policy, ref_rows, ref_weights, pad, temperature) if args.exact_reference else 0.0

    def rerun(removed, moments: str = "stored") -> list[float]:
        """The re-run's first-order change of every target (TARGETS order), then, with
        --exact-reference, the reference surrogate's exact change."""
        key = (tuple(sorted(int(i) for i in removed)), moments)
        if key not in cache:
            replay.rerun(np.setdiff1d(everyone, np.asarray(key[0], dtype=int)), seed=args.seed, moments=moments)
            delta = flat_trainable(policy) - theta0
            cache[key] = (target_matrix @ delta).tolist()
            if args.exact_reference:
                cache[key].append(surrogate_value(policy, ref_rows, ref_weights, pad, temperature) - before)
        return cache[key]

    m = args.remove
    result: dict = {
        "round": round_index, "records": n, "remove": m, "adam_step": step, "targets": list(TARGETS),
        "reference_reward_mean": float(ref_reward.mean()), "fresh_reward_mean": float(fresh_reward.mean()),
        "alignment": alignment,
        "scores": {s: v.tolist() for s, v in scores.items()},
        "all": rerun([]),
    }  # fmt: skip
    draws = np.random.default_rng(round_index)
    result["random"] = [rerun(draws.choice(n, size=m, replace=False)) for _ in range(args.draws)]
    variants = {}
    for s, values in scores.items():
        for j, t in enumerate(TARGETS):
            order = torch.argsort(values[:, j], descending=True).numpy()
            variants[f"{s}/{t}"] = {"top": rerun(order[:m]), "bottom": rerun(order[-m:]),
                                    "top_set": order[:m].tolist(), "bottom_set": order[-m:].tolist()}  # fmt: skip
    result["variants"] = variants
    if round_index in args.moments_rounds:  # how much fresh moments change the comparison
        order = torch.argsort(scores["raw"][:, 0], descending=True).numpy()
        result["fresh_moments"] = {
            "all": rerun([], "fresh"),
            "top": rerun(order[:m], "fresh"),
            "bottom": rerun(order[-m:], "fresh"),
            "random": [rerun(draws.choice(n, size=m, replace=False), "fresh") for _ in range(args.draws)],
        }
    t_signs = time.time()
    if round_index in args.lds_rounds:
        subsets = np.random.default_rng(50_000 + round_index)
        lds = []
        for _ in range(args.subsets):
            kept = np.sort(subsets.choice(n, size=n // 2, replace=False))
            lds.append({"kept": kept.tolist(), "change": rerun(np.setdiff1d(everyone, kept))})
        result["lds"] = lds
    if round_index in args.exact_rounds:  # first order against the reference's exact change
        scorer.load_round(round_index)
        before = surrogate_value(policy, ref_rows, ref_weights, pad, temperature)
        checks = []
        for key, change in list(cache.items())[: args.exact_checks]:
            replay.rerun(np.setdiff1d(everyone, np.asarray(key[0], dtype=int)), seed=args.seed, moments=key[1])
            exact = surrogate_value(policy, ref_rows, ref_weights, pad, temperature) - before
            checks.append({"removed": list(key[0]), "moments": key[1], "first_order": change[TARGETS.index("oracle")],
                           "exact": exact})  # fmt: skip
        result["exact_check"] = checks
    result["reruns"] = len(cache)
    result["seconds"] = {"sampling": t_sampled - t0, "scoring": t_scored - t_sampled, "sign_reruns": t_signs - t_scored,
                         "total": time.time() - t0}  # fmt: skip
    return result


BEHAVIOURS = {  # a fixed (prompt, response) per task: the behaviour target's log pi(response | prompt)
    "reviews": ("This movie was", " a wonderful surprise, and I loved every minute of it."),
    "sentiment": ("the movie was", "great fun lovely"),
}


def exact_record_gradients(replay: RoundReplay) -> torch.Tensor:
    """The round's records' exact loss gradients ``[N, D]`` at the loaded weights."""
    return torch.cat([f.gradients(None) for f in replay.record_scorer.record_factors(replay.scorer.policy, replay.records)])


def record_scores(replay: RoundReplay, target_grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw and Adam-aware scores ``[N]`` of the round's records on one target, at the snapshot."""
    record_grads = exact_record_gradients(replay)
    scores = {"raw": -(record_grads @ target_grad)}
    precondition = replay.adam_preconditioner()
    if precondition is not None:
        scores["adam"] = -((record_grads * precondition) @ target_grad)
    return scores


def analyse_behaviour_round(replay: RoundReplay, args, round_index: int) -> dict:
    """The behaviour sign test: re-runs without the top/bottom ``--remove`` records by each score on
    log pi(response | prompt), against random removal; exact and first-order changes."""
    from rlhf_influence.engine.targets import LogProbTarget

    scorer = replay.scorer
    policy = scorer.policy
    prompt, response = BEHAVIOURS[args.task]
    stored = {}
    if scorer.store.manifest.stored_gradients is not None:  # what `score` ranks by: the stored vectors
        stored["stored"] = torch.tensor([r.influence for r in scorer.score(round_index, prompt, response)])
        if replay.adam_preconditioner() is not None:
            stored["stored_adam"] = torch.tensor(
                [r.influence for r in scorer.score(round_index, prompt, response, adam=True)]
            )
    scorer.load_round(round_index)
    theta0 = flat_trainable(policy)
    target = LogProbTarget.from_text(scorer.tokenizer, [prompt], [response])
    target.temperature, target.positions_from_mask = scorer.temperature, scorer.positions_from_mask
    grad = target_gradients(policy, target, layout=scorer.layout)
    scores = {**record_scores(replay, grad), **stored}
    with torch.no_grad():
        before = float(target(policy).sum())
    n, m = len(replay), args.remove
    everyone = np.arange(n)
    cache: dict[tuple, tuple[float, float]] = {}

    def rerun(removed) -> tuple[float, float]:
        key = tuple(sorted(int(i) for i in removed))
        if key not in cache:
            replay.rerun(np.setdiff1d(everyone, np.asarray(key, dtype=int)), seed=args.seed)
            with torch.no_grad():
                exact = float(target(policy).sum()) - before
            cache[key] = (exact, float(grad @ (flat_trainable(policy) - theta0)))
        return cache[key]

    draws = np.random.default_rng(round_index)
    result = {"round": round_index, "prompt": prompt, "response": response, "all": rerun([]),
              "random": [rerun(draws.choice(n, size=m, replace=False)) for _ in range(args.draws)], "variants": {}}  # fmt: skip
    for name, values in scores.items():
        order = torch.argsort(values, descending=True).numpy()
        result["variants"][name] = {"top": rerun(order[:m]), "bottom": rerun(order[-m:])}
    return result


def analyse(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = SnapshotScorer(args.run)
    if not scorer.store.manifest.optimizer_state:
        sys.exit("the run stored no optimizer state: train it with --iif_store_optimizer_state true")
    task = get_task(args.task).build(seed=0)
    del task.policy, task.value_model
    for round_index in args.rounds:
        path = out / f"round_{round_index:03d}{'_behaviour' if args.behaviour else ''}.json"
        if path.is_file():
            continue
        replay = RoundReplay(scorer, round_index)
        if args.behaviour:
            result = analyse_behaviour_round(replay, args, round_index)
        else:
            result = analyse_round(replay, task, args, round_index)
        result["run"] = str(args.run)
        path.write_text(json.dumps(result))
        print(f"round {round_index} done", flush=True)


# ---------------------------------------------------------------------------------------------- summary
def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: P(X >= wins) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def summarise(args) -> None:
    out = Path(args.out)
    rounds = [json.loads(p.read_text()) for p in sorted(out.glob("round_???.json"))]
    if not rounds:
        sys.exit(f"no round results under {out}")
    judges = {"reference": TARGETS.index("oracle"), "own target": TARGETS.index("stored")}
    if len(rounds[0]["all"]) > len(TARGETS):  # --exact-reference: judge by the exact change
        judges["reference (exact)"] = len(TARGETS)
    rows = []
    for variant in rounds[0]["variants"]:
        row = {"variant": variant}
        for judge, j in judges.items():
            top_wins = bottom_wins = counted = 0
            for r in rounds:
                if variant not in r["variants"]:
                    continue
                random_mean = float(np.mean([d[j] for d in r["random"]]))
                v = r["variants"][variant]
                top_wins += v["top"][j] < random_mean  # removing the helpful lowers the target more
                bottom_wins += v["bottom"][j] > random_mean  # removing the harmful raises it more
                counted += 1
            row[judge] = {"rounds": counted, "top_wins": top_wins, "top_p": sign_test_p(top_wins, counted),
                          "bottom_wins": bottom_wins, "bottom_p": sign_test_p(bottom_wins, counted)}  # fmt: skip
        score, target = variant.split("/")
        lds = {judge: [] for judge in judges}
        for r in rounds:
            if "lds" not in r or score not in r["scores"]:
                continue
            values = np.nan_to_num(np.asarray(r["scores"][score])[:, TARGETS.index(target)])  # a zero gradient's cosine
            predicted = [values[s["kept"]].sum() for s in r["lds"]]
            for judge, j in judges.items():
                lds[judge].append(spearman(predicted, [s["change"][j] for s in r["lds"]]))
        row["lds"] = {judge: values for judge, values in lds.items()}
        rows.append(row)
    alignment = {}
    for key in rounds[-1]["alignment"]:
        values = [r["alignment"][key] for r in rounds if key in r["alignment"]]
        alignment[key] = {"median": float(np.median(values)), "rounds": len(values)}
    moments = [r["fresh_moments"] for r in rounds if "fresh_moments" in r]
    if "reference (exact)" in judges:  # per round: the first-order change against the exact one, over its re-runs
        first, exact = TARGETS.index("oracle"), len(TARGETS)
        agreement = []
        for r in rounds:
            changes = [r["all"], *r["random"], *[v[k] for v in r["variants"].values() for k in ("top", "bottom")],
                       *[s["change"] for s in r.get("lds", [])]]  # fmt: skip
            agreement.append(spearman([c[first] for c in changes], [c[exact] for c in changes]))
        summary_exact = {"median_spearman": float(np.median(agreement)), "min": float(min(agreement))}
    else:
        summary_exact = None
    checks = [c for r in rounds for c in r.get("exact_check", [])]
    summary = {
        "rounds": [r["round"] for r in rounds], "lds_rounds": [r["round"] for r in rounds if "lds" in r],
        "variants": rows, "alignment": alignment, "run": rounds[0].get("run"),
        "first_order_vs_exact": {
            "checks": len(checks),
            "spearman": spearman([c["first_order"] for c in checks], [c["exact"] for c in checks]) if len(checks) > 2 else None,
            "pairs": [(c["first_order"], c["exact"]) for c in checks],
        },
        "fresh_moments_rounds": len(moments),
        "first_order_vs_exact_reference": summary_exact,
    }  # fmt: skip
    if moments:
        j = judges["reference"]
        stored_top = [r["variants"]["raw/stored"]["top"][j] < np.mean([d[j] for d in r["random"]])
                      for r in rounds if "fresh_moments" in r]  # fmt: skip
        fresh_top = [f["top"][j] < np.mean([d[j] for d in f["random"]]) for f in moments]
        all_ratio = [f["all"][j] / r["all"][j] for f, r in zip(moments, [r for r in rounds if "fresh_moments" in r],
                                                                strict=True) if r["all"][j]]  # fmt: skip
        summary["fresh_moments"] = {"top_wins_stored": int(sum(stored_top)), "top_wins_fresh": int(sum(fresh_top)),
                                    "reference_change_fresh_over_stored": all_ratio}  # fmt: skip
    behaviour = [json.loads(p.read_text()) for p in sorted(out.glob("round_*_behaviour.json"))]
    if behaviour:
        summary["behaviour"] = {"prompt": behaviour[0]["prompt"], "response": behaviour[0]["response"]}
        for name in behaviour[-1]["variants"]:
            counted = [b for b in behaviour if name in b["variants"]]
            top = sum(b["variants"][name]["top"][0] < np.mean([d[0] for d in b["random"]]) for b in counted)
            bottom = sum(b["variants"][name]["bottom"][0] > np.mean([d[0] for d in b["random"]]) for b in counted)
            summary["behaviour"][name] = {"rounds": len(counted), "top_wins": int(top), "top_p": sign_test_p(int(top), len(counted)),
                                          "bottom_wins": int(bottom), "bottom_p": sign_test_p(int(bottom), len(counted))}  # fmt: skip
        pairs = [c for b in behaviour for c in [b["all"], *b["random"], *[v[k] for v in b["variants"].values() for k in ("top", "bottom")]]]
        summary["behaviour"]["first_order_vs_exact_spearman"] = spearman([c[1] for c in pairs], [c[0] for c in pairs])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "validity.png", args.title)
    (out / "table.md").write_text(table(summary))
    (out / "table_compact.md").write_text(compact(summary))
    print(table(summary))


def plot(summary: dict, path: Path, title: str) -> None:
    """Left: each score's LDS against the reference by target (median over the LDS rounds, bars the
    spread). Right: how well each target's gradient points where the reference's does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    targets = [t for t in TARGETS]
    width = 0.8 / len(SCORES)
    for i, score in enumerate(SCORES):
        rows = {r["variant"].split("/")[1]: r["lds"]["reference"] for r in summary["variants"]
                if r["variant"].startswith(score + "/")}  # fmt: skip
        xs = [j + (i - (len(SCORES) - 1) / 2) * width for j in range(len(targets))]
        med = [float(np.median(rows[t])) if rows.get(t) else np.nan for t in targets]
        low = [m - min(rows[t]) if rows.get(t) else 0 for m, t in zip(med, targets, strict=True)]
        high = [max(rows[t]) - m if rows.get(t) else 0 for m, t in zip(med, targets, strict=True)]
        left.bar(xs, med, width, yerr=[low, high], capsize=2, label=score, alpha=0.85)
    left.axhline(0, color="black", linewidth=0.6)
    left.set_xticks(range(len(targets)), targets)
    left.set(ylabel="LDS vs the reference (Spearman)", title=f"{title}: which score and target predict the re-runs")
    left.legend(fontsize=8)
    for kind in ("raw", "adam"):
        keys = [t for t in TARGETS[:-1] if f"{kind}/{t}" in summary["alignment"]]
        right.plot(keys, [summary["alignment"][f"{kind}/{t}"]["median"] for t in keys], marker="o", label=kind)
    right.axhline(0, color="black", linewidth=0.6)
    right.set(ylabel="cosine with the reference's gradient (median)", title="the target's gradient against the reference's")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMPACT = ("raw/stored", "adam/stored", "cosine/stored", "adam_cosine/stored", "raw/buffer", "raw/fresh16", "raw/fresh64",
           "raw/fresh128", "raw/fresh256", "adam/fresh256", "raw/oracle")  # fmt: skip


def compact(summary: dict) -> str:
    """The README's table: the sign tests and LDS against the reference (exact where measured) and
    LDS against the round's own target, for the variants that tell the story."""
    judge = "reference (exact)" if "reference (exact)" in summary["variants"][0] else "reference"
    lines = ["| score / target | top removed lowers the reference more than random | bottom removed raises it more | "
             "LDS vs the reference | LDS vs the round's own target |", "|---|---|---|---|---|"]  # fmt: skip
    rows = {r["variant"]: r for r in summary["variants"]}
    for name in COMPACT:
        if name not in rows:
            continue
        r, j = rows[name], rows[name][judge]

        def lds(values):
            return f"{np.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]" if values else "-"

        lines.append(f"| {name} | {j['top_wins']}/{j['rounds']} (p={j['top_p']:.2g}) | "
                     f"{j['bottom_wins']}/{j['rounds']} (p={j['bottom_p']:.2g}) | {lds(r['lds'][judge])} | "
                     f"{lds(r['lds']['own target'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def table(summary: dict) -> str:
    def cell(t):
        return f"{t['top_wins']}/{t['rounds']} (p={t['top_p']:.3g}) · {t['bottom_wins']}/{t['rounds']} (p={t['bottom_p']:.3g})"

    def lds(values):
        if not values:
            return "-"
        return f"{np.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"

    judges = [k for k in summary["variants"][0] if k not in ("variant", "lds")]
    header = " | ".join(f"sign test vs {j}: top · bottom | LDS vs {j}, median [min, max]" for j in judges)
    lines = [f"| score / target | {header} |", "|---" * (1 + 2 * len(judges)) + "|"]
    for row in summary["variants"]:
        cells = " | ".join(f"{cell(row[j])} | {lds(row['lds'][j])}" for j in judges)
        lines.append(f"| {row['variant']} | {cells} |")
    if "behaviour" in summary:
        b = summary["behaviour"]
        lines += ["", f"Behaviour: log p({b['response']!r} | {b['prompt']!r}), exact change after each re-run.", "",
                  "| score | top removed lowers it more than random | bottom removed raises it more than random |",
                  "|---|---|---|"]  # fmt: skip
        for name in ("raw", "adam"):
            if name in b:
                lines.append(f"| {name} | {b[name]['top_wins']}/{b[name]['rounds']} (p={b[name]['top_p']:.3g}) | "
                             f"{b[name]['bottom_wins']}/{b[name]['rounds']} (p={b[name]['bottom_p']:.3g}) |")  # fmt: skip
    lines += ["", "| target gradient | cosine with the reference's, median over rounds |", "|---|---|"]
    for key, value in summary["alignment"].items():
        lines.append(f"| {key} | {value['median']:.3f} ({value['rounds']} rounds) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyse", help="re-run rounds of a stored run and write one JSON per round")
    a.add_argument("--run", required=True, help="the run's store (output_dir/attribution or output_dir)")
    a.add_argument("--task", default="reviews", help="the embedded task the run trained (prompts, reward)")
    a.add_argument("--rounds", type=int, nargs="+", required=True)
    a.add_argument("--lds-rounds", type=int, nargs="*", default=[])
    a.add_argument("--moments-rounds", type=int, nargs="*", default=[])
    a.add_argument("--exact-rounds", type=int, nargs="*", default=[])
    a.add_argument("--exact-checks", type=int, default=8)
    a.add_argument("--exact-reference", action="store_true",
                   help="also evaluate the reference surrogate's exact change after every re-run (a forward over it each)")
    a.add_argument("--reference", type=int, default=256, help="reference samples (training-split prompts)")
    a.add_argument("--heldout-prompts", type=int, default=64)
    a.add_argument("--samples", type=int, default=4, help="responses per held-out prompt (fresh256 needs 4)")
    a.add_argument("--remove", type=int, default=4)
    a.add_argument("--draws", type=int, default=5)
    a.add_argument("--subsets", type=int, default=32)
    a.add_argument("--seed", type=int, default=0, help="the re-runs' mini-batch order")
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--behaviour", action="store_true",
                   help="the behaviour sign test instead: a fixed response's log-prob (BEHAVIOURS) as the target")
    a.add_argument("--out", required=True)
    s = sub.add_parser("summarise", help="sign tests, LDS and target alignment over the rounds in --out")
    s.add_argument("--out", required=True)
    s.add_argument("--title", default="", help="the plot's title (e.g. the task)")
    args = parser.parse_args(argv)
    analyse(args) if args.command == "analyse" else summarise(args)


if __name__ == "__main__":
    main()
