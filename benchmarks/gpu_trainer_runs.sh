#!/usr/bin/env bash
# The trainer measurements to take on one GPU (device platform), in one go, with portable_rl installed:
#   benchmarks/gpu_trainer_runs.sh OUT_DIR
# doctor (which attention and dtype the trainer uses), the kernels/determinism/training conformance checks
# (hf_roundtrip and packed_vs_unpacked in bf16 included), and bench_megatron_vs_hf at the sizes the GPU
# targets name: SmolLM2 shape 32x512 tokens, Qwen2.5-1.5B shape with 8k-token packs, one 32k-token sample.
# Each step has its own time limit and its own log; a failing step does not stop the others.
set -u
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit $?" | tee -a "$out/summary.txt"
    grep -vi "warn" "$out/$name.log" | tail -8 | tee -a "$out/summary.txt"
}

step doctor 60 python3 -m portable_rl.cli doctor
step conformance 240 python3 -m portable_rl.cli conformance --only kernels determinism training --report "$out"
step bench_smollm 180 python3 benchmarks/bench_megatron_vs_hf.py --models smollm --samples 32 \
    --prompt-len 64 --response-len 448 --micro-batch-size 16 --max-tokens 8192 --iters 5
step bench_qwen_8k 240 python3 benchmarks/bench_megatron_vs_hf.py --models qwen1.5b --samples 8 \
    --prompt-len 64 --response-len 960 --micro-batch-size 2 --max-tokens 8192 --iters 3
step bench_qwen_32k 240 python3 benchmarks/bench_megatron_vs_hf.py --models qwen1.5b --samples 1 \
    --prompt-len 64 --response-len 32704 --micro-batch-size 1 --max-tokens 32768 --iters 2
