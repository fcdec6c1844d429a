#!/usr/bin/env bash
# The GPU run, prepared on a CPU: the engine, the trainer and the real-LM task on CUDA, in one go.
#
#   bash benchmarks/gpu_check.sh [--smoke] [--budget SECONDS] [STEP ...]
#
# Steps (default: all, in this order; each has its own log, and one that fails or runs out of
# time does not stop the others):
#   env       the device, driver, torch and the packages the project uses
#   engine    benchmarks/engine_check.py: exact per-record gradients against brute-force autograd on
#             SmolLM2-135M-Instruct in float32, bf16 autocast and bf16 weights (exits 1 on a miss)
#   overhead  benchmarks/overhead.py --task reviews: plain PPO, the round and epoch schedules and
#             the buffer target, a few rounds each in bf16: time per round, its split, peak memory
#             ($OVERHEAD_ARMS picks the IIF arms, default "iif_round iif_epoch iif_round_buffer")
#   record    benchmarks/record_cost.py --task reviews: what recording the attribution store costs,
#             plain PPO and GRPO against record-only runs (snapshot and training-pass gradients; GRPO
#             also without the store's KL curve), bf16
#   bench     benchmarks/bench_engine.py --model smollm2: exact, projected and scoring against the
#             floor (one forward+backward) and the peers (loop, vmap), float32; bf16 without peers
#   efficacy  benchmarks/iif_vs_ppo.py --task reviews: PPO, IIF (round schedule) and the random
#             control, 3 seeds, as 9 processes at once on the one GPU, in the time that is left
#
# --smoke runs every step on the tiny task and a tiny Llama, 2 rounds: seconds on a CPU, and on a
# CUDA device it exercises the same CUDA code paths without the real LM. --budget (default 540)
# is the wall time the whole script may take: each step gets a share and the efficacy step the
# rest, so the results are packed before a caller's time limit.
#
# Results go to $OUT when set (a device machine's output folder), else benchmarks/results/gpu_check:
# summary.log (every step's table), and results.tar.gz (logs, JSON, tables, plots, the efficacy
# runs' per-round metrics). $PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
budget=540
steps=()
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --budget) budget=$2; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        env|engine|overhead|record|bench|efficacy) steps+=("$1") ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#steps[@]} -eq 0 ] && steps=(env engine overhead record bench efficacy)
python=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/gpu_check}
work=$(mktemp -d)
results="$work/results"
mkdir -p "$out" "$results"
start=$(date +%s)
failed=()

# seconds this step may take: its share, never more than what is left before the packing
allow() {
    local left=$((budget - ($(date +%s) - start) - 20))
    [ "$1" -lt "$left" ] && left=$1
    echo $((left > 5 ? left : 5))
}

# run STEP SECONDS CMD...: the command under a time limit, its output in results/STEP.log
step() {
    local name=$1 limit
    limit=$(allow "$2")
    shift 2
    echo "== $name (at most $limit s): $*" | tee -a "$results/summary.log"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$results/$name.log" 2>&1
    local rc=$?
    local verdict="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="ran out of time"
    [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="failed (exit $rc)"
    [ "$verdict" != ok ] && failed+=("$name")
    echo "== $name: $verdict in $(($(date +%s) - t0)) s" | tee -a "$results/summary.log"
    grep -E '^\||^FAILED|^task |^torch |^NVIDIA|^name,|Error' "$results/$name.log" | head -60 >>"$results/summary.log"
}

if [ $smoke -eq 1 ]; then
    model=tiny task=sentiment rounds=2 record_rounds=3 seeds=(0) bench_grid=(--batch-sizes 4 --seq-lens 8 --hidden 32 --layers 1
        --vocab 64 --repeats 1) bf16_grid=("${bench_grid[@]}") efficacy_rounds=2
else
    model=smollm2 task=reviews rounds=6 record_rounds=10 seeds=(0 1 2) bench_grid=(--model smollm2 --rank 16 --batch-sizes 16 64 256
        --seq-lens 64 256 --repeats 3) bf16_grid=(--model smollm2 --rank 16 --batch-sizes 16 64 256 --seq-lens 64 256
        512 --repeats 3) efficacy_rounds=30
fi

for s in "${steps[@]}"; do
    case $s in
        env) step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1;
            $python -c 'import torch, trl, transformers, peft, accelerate; print(\"torch\", torch.__version__,
            \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\",
            \"trl\", trl.__version__, \"transformers\", transformers.__version__, \"peft\", peft.__version__,
            \"accelerate\", accelerate.__version__)'" ;;
        engine) step engine 150 "$python" benchmarks/engine_check.py --model $model --out "$results" ;;
        overhead) step overhead 200 "$python" benchmarks/overhead.py --task $task --rounds $rounds \
            --arms ${OVERHEAD_ARMS:-iif_round iif_epoch iif_round_buffer} --out "$results/overhead" ;;
        record) step record 300 bash -c "$python benchmarks/record_cost.py --task $task --rounds $record_rounds \
            --algorithms ppo --arms plain record_snapshot record_training --out $results/record_ppo;
            $python benchmarks/record_cost.py --task $task --rounds $record_rounds --algorithms grpo \
            --arms plain record_training_nokl record_training record_snapshot --out $results/record_grpo" ;;
        bench) step bench 150 bash -c "$python benchmarks/bench_engine.py ${bench_grid[*]} --out $results/bench_engine_float32 &&
            $python benchmarks/bench_engine.py ${bf16_grid[*]} --dtype bfloat16 --no-peers --out $results/bench_engine_bf16" ;;
        efficacy) step efficacy 100000 "$python" benchmarks/iif_vs_ppo.py --task $task --arms ppo iif_round random_round \
            --seeds "${seeds[@]}" --rounds $efficacy_rounds --parallel 9 --out "$results/efficacy" ;;
    esac
done

# pack what came out (the efficacy runs: their per-round metrics, not their adapter snapshots)
(cd "$work" && find results -type f \( -name '*.log' -o -name '*.json' -o -name '*.md' -o -name '*.png' \) \
    -not -path '*/tokenizer/*' | tar czf results.tar.gz -T -)
cp "$work/results.tar.gz" "$results/summary.log" "$out/"
echo "== done in $(($(date +%s) - start)) s; failed: ${failed[*]:-none}" | tee -a "$out/summary.log"
rm -rf "$work"
[ ${#failed[@]} -eq 0 ]
