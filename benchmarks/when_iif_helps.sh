#!/usr/bin/env bash
# When does IIF pay? The experiments behind benchmarks/README.md, "When IIF helps", one after the other
# (each is benchmarks/iif_vs_ppo.py: 5 seeds paired, 2 runs at a time on one thread each).
#
#   bash benchmarks/when_iif_helps.sh [EXPERIMENT ...]     # default: all, about 2 hours on 2 CPU cores
#
#   default     the default task's optimisation (4 epochs of 4 mini-batches of 8 records): PPO, IIF and
#               the random control, dropping steps (the default) or keeping them (iif_keep_steps);
#               IIF with p=0.5, with 64 held-out prompts a round, and with advantages whitened after filtering
#   noise       the same task with the sign of 20% of the rewards flipped (noisy_sentiment)
#   keywords    the harder task (rare rewarded words), PPO, IIF and random, both regimes
#   whole       one mini-batch of the whole round (1 step an epoch)
#   single      mini-batches of one record, as the paper's code (32 steps an epoch, lr 1e-3)
#
# Results go to benchmarks/results/when_iif_helps/<experiment>/ (table.md, summary.json, the plot);
# finished runs are reused, so a stopped script picks up where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-benchmarks/results/when_iif_helps}
experiments=("$@")
[ ${#experiments[@]} -eq 0 ] && experiments=(default noise keywords whole single)
both=(ppo iif_round random_round iif_round_steps random_round_steps)
for e in "${experiments[@]}"; do
    case $e in
        default) args=(--task sentiment --arms "${both[@]}" iif_round_half iif_round_heldout64 iif_round_rewhiten) ;;
        noise) args=(--task noisy_sentiment --arms "${both[@]}") ;;
        single) args=(--task sentiment --arms ppo iif_round iif_round_steps random_round_steps
                      --set num_mini_batches=32 learning_rate=1e-3) ;;
        whole) args=(--task sentiment --arms ppo iif_round random_round --set num_mini_batches=1) ;;
        keywords) args=(--task keywords --arms "${both[@]}") ;;
        *) echo "when_iif_helps.sh: unknown experiment $e" >&2; exit 2 ;;
    esac
    echo "== $e: ${args[*]}"
    start=$(date +%s)
    "$python" benchmarks/iif_vs_ppo.py "${args[@]}" --seeds 0 1 2 3 4 --parallel 2 --out "$out/$e" >"$out.$e.log" 2>&1 \
        || { tail -20 "$out.$e.log"; echo "== $e failed" >&2; continue; }
    mv "$out.$e.log" "$out/$e/run.log"
    echo "== $e done in $(($(date +%s) - start)) s"
done
