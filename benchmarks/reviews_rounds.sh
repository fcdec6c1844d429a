#!/usr/bin/env bash
# The reviews task (SmolLM2-135M-Instruct + LoRA r=16) for ROUNDS rounds on this machine's device:
# plain PPO (iif_drop_fraction 0), IIF with the round schedule, IIF with the epoch schedule, one
# after the other on the same seed, then the time per round and its split and the reward
# (benchmarks/round_times.py).
#
#   bash benchmarks/reviews_rounds.sh [--smoke] [ROUNDS]     # ROUNDS: default 8
#
# On a CUDA machine the recipe trains in bf16 (its default there), on a CPU in float32. --smoke
# runs the tiny default task for 2 rounds instead: it checks the script in seconds on a CPU.
# Results (logs, summary.json, table.md) go to $OUT when set, else benchmarks/results/reviews_rounds;
# the runs to $RUNS (default runs/reviews_rounds). $PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
task=reviews
rounds=8
if [ "${1:-}" = "--smoke" ]; then task=sentiment; rounds=2; shift; fi
rounds=${1:-$rounds}
out=${OUT:-benchmarks/results/reviews_rounds}
runs=${RUNS:-runs/reviews_rounds}
python=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
rm -rf "$runs"
per_round=$("$python" -c "from rlhf_influence.tasks import get_task; print(get_task('$task').records_per_round)")
device=$("$python" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (no CUDA device)')")
echo "task $task, $rounds rounds of $per_round records, on $device"
declare -A flags=([ppo]="--iif_drop_fraction 0" [iif_round]="--iif_schedule round" [iif_epoch]="--iif_schedule epoch")
for arm in ppo iif_round iif_epoch; do
    start=$(date +%s)
    # shellcheck disable=SC2086
    if ! "$python" recipes/ppo_iif.py --embedded_task "$task" --total_episodes $((per_round * rounds)) \
        --output_dir "$runs/$arm" --disable_tqdm true --save_strategy no --save_final_model false --value_head separate \
        ${flags[$arm]} >"$out/$arm.log" 2>&1; then
        tail -40 "$out/$arm.log"
        echo "reviews_rounds.sh: the $arm run failed; its log: $out/$arm.log" >&2
        exit 1
    fi
    echo "$arm: $(($(date +%s) - start)) s in all (model loading included)"
done
"$python" benchmarks/round_times.py ppo="$runs/ppo" iif_round="$runs/iif_round" iif_epoch="$runs/iif_epoch" \
    --out "$out" --device "$device, task $task"
