#!/usr/bin/env bash
# tests/gpu spread over several GPUs, one pytest process per GPU, for a device call of many GPUs; logs under $OUT.
#   GPUS="2 3" T_TESTS=480 bash bench/tests_session.sh tests/gpu/test_families_cuda.py ...
# Measured on 2x H200 (2026-11-28): 4 processes per GPU ran ~55 s per test (contexts time-sliced on each GPU, Triton
# compiling in every process), one process alone ~2.4 s per test (tests/gpu/test_families_cuda.py).
# Arguments: test files or node ids; every collected test goes to one shard, round-robin, in collection order
# (FROM=N skips the first N). Each shard's log and the summary lines go to $OUT/t-shards.log; a test still running
# after 100 s writes its stacks to $OUT/shards/stacks.log (tests/conftest.py).
. bench/session_env.sh
read -ra shards <<<"${GPUS:-0}"
n=${#shards[@]}
tmp=$(mktemp -d)
python -m pytest --collect-only -q -p no:cacheprovider "$@" 2>/dev/null | grep '::' | tail -n +$((${FROM:-0} + 1)) \
    | awk -v n="$n" -v d="$tmp" '{ print > (d "/ids" (NR - 1) % n) }'
mkdir -p "$OUT/shards"
for i in $(seq 0 $((n - 1))); do
    [ -f "$tmp/ids$i" ] || continue
    (
        mapfile -t ids <"$tmp/ids$i"
        CUDA_VISIBLE_DEVICES=${shards[$i]} ACB_TEST_DUMP_S=100 ACB_TEST_DUMP_DIR="$OUT/shards" timeout "${T_TESTS:-480}" \
            python -m pytest -q -p no:cacheprovider "${ids[@]}" >"$tmp/log$i" 2>&1
        echo "exit $?" >>"$tmp/log$i"
    ) &
done
wait
for i in $(seq 0 $((n - 1))); do
    [ -f "$tmp/log$i" ] || continue
    echo "== shard $i (GPU ${shards[$i]}, $(wc -l <"$tmp/ids$i") tests): $(grep -E 'passed|failed|error|skipped' "$tmp/log$i" \
        | tail -1) $(tail -1 "$tmp/log$i")" | tee -a "$log"
    { echo "######## shard $i"; cat "$tmp/log$i"; } >>"$OUT/t-shards.log"
done
