#!/usr/bin/env bash
# One device call on a machine of 4 GPUs (issue 17), logs and JSON under $OUT (at most 8 files come back):
#   1. in parallel: tests/gpu/test_parallel_cuda.py on GPUs 0-1, the other tests/gpu files on GPUs 2 and 3;
#   2. all-reduce latency, NCCL vs the one-shot kernel, over 2 and 4 GPUs (bench.allreduce);
#   3. W-tp: llama-8b at TP=1 and TP=2 (one-shot sums), then TP=2 with NCCL only; or, with PART=70b, W-tp70 at TP=4.
# pytest-asyncio is not on the card's image: carry its unzipped wheel as .gpu_site (see shared/gpu.md).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu_site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 ACB_COMMIT=${ACB_COMMIT:-unknown}
log="$OUT/session.log"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m; } >"$log" 2>&1
run_tests() {  # devices, log name, files...
    local dev=$1 name=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$dev timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -p no:cacheprovider "$@" \
        >"$OUT/$name.log" 2>&1
    echo "exit $?" >>"$OUT/$name.log"
}
if [ "${PART:-8b}" = 8b ]; then
    run_tests 0,1 t-parallel tests/gpu/test_parallel_cuda.py &
    run_tests 2 t-engine tests/gpu/test_engine_cuda.py &
    run_tests 3 t-rest tests/gpu/test_families_cuda.py tests/gpu/test_kernels.py tests/gpu/test_logits_cuda.py &
    wait
    for f in t-parallel t-engine t-rest; do echo "== $f: $(tail -2 "$OUT/$f.log" | tr '\n' ' ')" >>"$log"; done
    for w in 2 4; do
        CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 90 python -m bench.allreduce --world $w --json "$OUT/ar$w.json" >>"$log" 2>&1
    done
    timeout 240 python -m bench.run --no-progress --workloads W-tp --modes "async,async[tensor_parallel_size=2]" \
        --json "$OUT/tp.json" 2>&1 | grep -v "^\s*$" | tail -30 >>"$log"
    ACB_ALLREDUCE=nccl timeout 150 python -m bench.run --no-progress --workloads W-tp \
        --modes "async[tensor_parallel_size=2]" --json "$OUT/tp-nccl.json" 2>&1 | grep -v "^\s*$" | tail -20 >>"$log"
else
    timeout 400 python -m bench.run --no-progress --workloads W-tp70 --modes "async[tensor_parallel_size=4]" \
        --json "$OUT/tp70.json" 2>&1 | grep -v "^\s*$" | tail -30 >>"$log"
fi
cat "$log"
