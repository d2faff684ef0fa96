#!/usr/bin/env bash
# The measurements to take on one GPU (device platform), in one go, with portable_rl installed:
#   benchmarks/gpu_trainer_runs.sh OUT_DIR [BUDGET_S]
# In order of value, each with its own time limit and log (a failing step does not stop the others), and none
# started past BUDGET_S seconds (default 900) or allowed to run beyond it:
# doctor (which attention and dtype the trainer uses); the platform and trainer conformance checks (kernels,
# collectives, determinism, Ray device visibility, training: Megatron vs HF in bf16, TP2 vs TP1, packed vs
# unpacked); the tiny recipe end to end (trainer on the GPU, the CPU engine, broadcast weight sync, weight
# checks on); train.share_prompt_prefix off/on at a GPU-sized GRPO batch; and bench_megatron_vs_hf at the sizes
# the GPU targets name: SmolLM2 shape 32x512 tokens, Qwen2.5-1.5B shape with 8k-token packs, one 32k sample.
# SGLang does not travel to a bare GPU test machine, so the engine and weight-sync checks against SGLang (the
# rollout.*, weight_sync.* and golden conformance checks) are not in this list; run them in the vendor image.
set -u
out=${1:?usage: $0 OUT_DIR [BUDGET_S]}
budget=${2:-900}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
start=$SECONDS

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 left=$((budget - (SECONDS - start)))
    shift 2
    if [ "$left" -lt 20 ]; then
        echo "== $name: not started, budget spent" | tee -a "$out/summary.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$out/summary.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - t0))s" | tee -a "$out/summary.txt"
    grep -vi "warn" "$out/$name.log" | tail -12 | tee -a "$out/summary.txt"
}

step doctor 60 python3 -m portable_rl.cli doctor
step conformance 240 python3 -m portable_rl.cli conformance \
    --only kernels collectives determinism ray training --report "$out"
step train_tiny 150 python3 -m portable_rl.cli train examples/tiny_cpu.yaml rollout.engine=cpu \
    weight_sync.strategy=broadcast run.steps=3 run.output_dir="$out/train_tiny"
step bench_smollm 150 python3 benchmarks/bench_megatron_vs_hf.py --models smollm --samples 32 \
    --prompt-len 64 --response-len 448 --micro-batch-size 16 --max-tokens 8192 --iters 5
step share_prompt 120 python3 benchmarks/bench_share_prompt.py --prompts 8 --group 8 --prompt-len 256 \
    --response-len 256 --micro-batch-size 16 --iters 3
step bench_qwen_8k 180 python3 benchmarks/bench_megatron_vs_hf.py --models qwen1.5b --samples 8 \
    --prompt-len 64 --response-len 960 --micro-batch-size 2 --max-tokens 8192 --iters 3
step bench_qwen_32k 180 python3 benchmarks/bench_megatron_vs_hf.py --models qwen1.5b --samples 1 \
    --prompt-len 64 --response-len 32704 --micro-batch-size 1 --max-tokens 32768 --iters 2
