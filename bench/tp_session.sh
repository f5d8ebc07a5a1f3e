#!/usr/bin/env bash
# One device call on a machine of 4 GPUs (issue 17); logs and JSON under $OUT (at most 8 files come back).
#   1. all-reduce latency over 2 and 4 GPUs: NCCL against the one-shot kernel's two variants (bench.allreduce),
#      which picks the variant (or NCCL) for the runs below;
#   2. in parallel: tests/gpu/test_parallel_cuda.py on GPUs 0-1; W-tp (llama-8b, TP=1 then TP=2) on GPUs 2-3;
#   3. W-tp70: the llama-70b shape at TP=4.
# PART=pair: a machine of 2 GPUs (AR=1: bench.allreduce first; W-tp TP=1 vs TP=2, KERNELS=N for a profile; EXTRA="VAR=value|mode ..." more
# W-tp rows, each in its own process with that environment; then the TP tests: TESTS files, TESTS_K filters,
# T_TESTS=0 skips them).
# PART=tp70: W-tp70 at TP=4, once per ENV70 entry (VAR=value; default the one-shot sums).
# PART=rest instead: W-tp at TP=2 with NCCL only (the one-shot sums' A/B) on GPUs 0-1, and the other tests/gpu files
# on GPUs 2 and 3 (a second call).
# Every benchmark process dumps its threads' stacks if it is still running after DUMP_AFTER seconds (a hang); every
# test that runs longer than 100 s writes its stacks to $OUT/<tests>/stacks.log. Each run prints GPU time per kind
# of step (--step-kinds).
# pytest-asyncio is not on the card's image: carry its unzipped wheel as .gpu_site (see shared/gpu.md).
. bench/session_env.sh
mkdir -p /tmp/diag
cat >/tmp/diag/sitecustomize.py <<'PY'
import faulthandler, os
if os.environ.get("DUMP_AFTER"):
    faulthandler.dump_traceback_later(float(os.environ["DUMP_AFTER"]), exit=False)
PY
with_dump() {  # seconds, command...: the command with stack dumps after that many seconds
    local after=$1
    shift
    DUMP_AFTER=$after PYTHONPATH="/tmp/diag:$PYTHONPATH" "$@"
}
# a test still running after 100 s writes its stacks into $OUT/<dir>/stacks.log (tests/conftest.py)
tdump() { mkdir -p "$OUT/$1" && echo "ACB_TEST_DUMP_S=100 ACB_TEST_DUMP_DIR=$OUT/$1"; }
choice() {  # the all-reduce bench's pick; push (measured best on 2026-11-27) when it did not run
    [ -f "$1" ] || { echo push; return; }
    python -c "import json; print(json.load(open('$1'))['choice'])" 2>/dev/null || echo nccl; }
if [ "${PART:-}" = pair ]; then  # a machine of 2 GPUs: W-tp TP=1 vs TP=2, then the TP tests (TESTS_K: pytest -k)
    if [ "${AR:-0}" = 1 ]; then  # AR=1: the all-reduce and gather table first
        CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1} with_dump 50 timeout 60 python -m bench.allreduce --world 2 \
            --json "$OUT/ar2.json" 2>&1 | grep -v "^frame #" | tail -14 >>"$log"
    fi
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1} with_dump 170 timeout 200 python -m bench.run --no-progress --workloads W-tp \
        --step-kinds ${KERNELS:+--kernels $KERNELS} --modes "async,async[tensor_parallel_size=2]" \
        --json "$OUT/tp.json" >"$OUT/tp.log" 2>&1
    grep -v "^\[W\|^frame #" "$OUT/tp.log" | tail -90 >>"$log"
    i=0
    for v in ${EXTRA:-}; do  # more W-tp rows, each "VAR=value|mode" (a process of its own with that environment)
        i=$((i + 1))
        (export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1} "${v%%|*}" && with_dump 170 timeout 200 python -m \
            bench.run --no-progress --workloads W-tp --modes "${v#*|}" --json "$OUT/tp-extra$i.json" \
            >"$OUT/tp-extra$i.log" 2>&1)
        echo "== ${v%%|*}: $(grep "^| W-tp" "$OUT/tp-extra$i.log" | tail -1)" >>"$log"
    done
    [ "${T_TESTS:-330}" = 0 ] && { cat "$log"; exit 0; }  # T_TESTS=0: W-tp alone
    (
        CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1} env $(tdump parallel) timeout "${T_TESTS:-330}" python -m pytest -q \
            -p no:cacheprovider ${TESTS:-tests/gpu/test_parallel_cuda.py} -k "${TESTS_K:-}" >"$OUT/t-parallel.log" 2>&1
        echo "exit $?" >>"$OUT/t-parallel.log"
    )
    echo "== tests: $(grep -E 'passed|failed' "$OUT/t-parallel.log" | tail -1) $(tail -1 "$OUT/t-parallel.log")" >>"$log"
    cat "$log"
    exit 0
fi
if [ "${PART:-}" = tp70 ]; then  # 4 GPUs: W-tp70 at TP=4, once per ENV70 entry (VAR=value, each its own process)
    for v in ${ENV70:-ACB_ALLREDUCE=push}; do
        (export "$v" && with_dump 160 timeout 180 python -m bench.run --no-progress --workloads W-tp70 --step-kinds \
            --modes "async[tensor_parallel_size=4]" --json "$OUT/tp70-${v#*=}.json" >"$OUT/tp70-${v#*=}.log" 2>&1)
        echo "== $v: $(grep "^| W-tp" "$OUT/tp70-${v#*=}.log" | tail -1)" >>"$log"
    done
    cat "$log"
    exit 0
fi
if [ "${PART:-}" = rest ]; then
    (
        CUDA_VISIBLE_DEVICES=2 env $(tdump engine) timeout 420 python -m pytest -q -p no:cacheprovider \
            tests/gpu/test_engine_cuda.py >"$OUT/t-engine.log" 2>&1
        echo "exit $?" >>"$OUT/t-engine.log"
    ) &
    (
        CUDA_VISIBLE_DEVICES=3 env $(tdump rest) timeout 420 python -m pytest -q -p no:cacheprovider \
            tests/gpu/test_families_cuda.py tests/gpu/test_kernels.py tests/gpu/test_logits_cuda.py \
            >"$OUT/t-rest.log" 2>&1
        echo "exit $?" >>"$OUT/t-rest.log"
    ) &
    CUDA_VISIBLE_DEVICES=0,1 ACB_ALLREDUCE=nccl with_dump 170 timeout 200 python -m bench.run --no-progress \
        --workloads W-tp --modes "async[tensor_parallel_size=2]" --json "$OUT/tp-nccl.json" >"$OUT/tp-nccl.log" 2>&1
    wait
    for f in t-engine t-rest; do echo "== $f: $(grep -E 'passed|failed' "$OUT/$f.log" | tail -1)" >>"$log"; done
    grep "^| W-tp" "$OUT/tp-nccl.log" >>"$log"
    cat "$log"
    exit 0
fi
for w in ${AR_WORLDS-2 4}; do  # AR_WORLDS= skips the all-reduce table (measured twice on 2026-11-27)
    with_dump 40 timeout 45 python -m bench.allreduce --world $w --json "$OUT/ar$w.json" 2>&1 | grep -v "^frame #" \
        | tail -12 >>"$log"
done
c2=$(choice "$OUT/ar2.json")
c4=$(choice "$OUT/ar4.json")
echo "== all-reduce: $c2 at TP=2, $c4 at TP=4" >>"$log"
(
    CUDA_VISIBLE_DEVICES=0,1 ACB_ALLREDUCE=$c2 env $(tdump parallel) timeout 400 python -m pytest -q -p no:cacheprovider \
        tests/gpu/test_parallel_cuda.py >"$OUT/t-parallel.log" 2>&1
    echo "exit $?" >>"$OUT/t-parallel.log"
) &
CUDA_VISIBLE_DEVICES=2,3 ACB_ALLREDUCE=$c2 with_dump 170 timeout 200 python -m bench.run --no-progress \
    --workloads W-tp --step-kinds --modes "async,async[tensor_parallel_size=2]" --json "$OUT/tp.json" >"$OUT/tp.log" 2>&1
wait
echo "== tests: $(grep -E 'passed|failed' "$OUT/t-parallel.log" | tail -1) $(tail -1 "$OUT/t-parallel.log")" >>"$log"
grep "^| W-tp" "$OUT/tp.log" >>"$log"
ACB_ALLREDUCE=$c4 with_dump 160 timeout 180 python -m bench.run --no-progress --workloads W-tp70 --step-kinds \
    --modes "async[tensor_parallel_size=4]" --json "$OUT/tp70.json" >"$OUT/tp70.log" 2>&1
grep "^| W-tp" "$OUT/tp70.log" >>"$log"
cat "$log"
