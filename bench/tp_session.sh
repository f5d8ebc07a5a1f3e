#!/usr/bin/env bash
# Device calls on a machine of 4 GPUs (issue 17); logs and JSON under $OUT (at most 8 files come back).
#   PART=check (default): all-reduce latency, NCCL vs the one-shot kernel, over 2 and 4 GPUs (bench.allreduce);
#     tests/gpu/test_parallel_cuda.py with the one-shot sums (GPUs 0-1) and with NCCL only (GPUs 2-3), in parallel;
#     W-tp: llama-8b at TP=1 and TP=2, then TP=2 with NCCL only.
#   PART=70b: W-tp70, the llama-70b shape at TP=4; then the rest of tests/gpu on the 4 GPUs in parallel.
# pytest-asyncio is not on the card's image: carry its unzipped wheel as .gpu_site (see shared/gpu.md).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu_site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 ACB_COMMIT=${ACB_COMMIT:-unknown}
log="$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$log" 2>&1
run_tests() {  # devices, log name, pytest arguments...
    local dev=$1 name=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$dev timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -p no:cacheprovider "$@" \
        >"$OUT/$name.log" 2>&1
    echo "exit $?" >>"$OUT/$name.log"
    echo "== $name: $(grep -E 'passed|failed|error' "$OUT/$name.log" | tail -1) $(tail -1 "$OUT/$name.log")" >>"$log"
}
bench_run() {  # json name, bench.run arguments...
    local name=$1
    shift
    timeout "${BENCH_TIMEOUT:-200}" python -m bench.run --no-progress --json "$OUT/$name.json" "$@" 2>&1 \
        | grep -v "^\s*$" | grep -v "^frame #" | tail -25 >>"$log"
}
if [ "${PART:-check}" = check ]; then
    for w in 2 4; do
        timeout 90 python -m bench.allreduce --world $w --json "$OUT/ar$w.json" 2>&1 | grep -v "^frame #" | tail -25 >>"$log"
    done
    run_tests 0,1 t-par-oneshot tests/gpu/test_parallel_cuda.py &
    ACB_ALLREDUCE=nccl run_tests 2,3 t-par-nccl tests/gpu/test_parallel_cuda.py &
    wait
    bench_run tp --workloads W-tp --modes "async,async[tensor_parallel_size=2]"
    ACB_ALLREDUCE=nccl bench_run tp-nccl --workloads W-tp --modes "async[tensor_parallel_size=2]"
else
    BENCH_TIMEOUT=330 bench_run tp70 --workloads W-tp70 --modes "async[tensor_parallel_size=4]"
    run_tests 0 t-engine tests/gpu/test_engine_cuda.py &
    run_tests 1 t-families tests/gpu/test_families_cuda.py &
    run_tests 2 t-rest tests/gpu/test_kernels.py tests/gpu/test_logits_cuda.py &
    wait
fi
cat "$log"
