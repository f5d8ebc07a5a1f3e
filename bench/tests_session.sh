#!/usr/bin/env bash
# tests/gpu spread over several GPUs, one pytest process per GPU (PER_GPU=N: N processes per GPU), for a device call of
# many GPUs; logs under $OUT.
#   GPUS="2 3" T_TESTS=480 bash bench/tests_session.sh tests/gpu/test_families_cuda.py ...
# Measured on 2x H200 (2026-11-28): 4 processes per GPU ran ~55 s per test (contexts time-sliced on each GPU, Triton
# compiling in every process), one process alone ~2.4 s per test (tests/gpu/test_families_cuda.py): keep PER_GPU=1.
# Arguments: test files or node ids; every collected test goes to one shard, round-robin, in collection order
# (FROM=N skips the first N). Each shard's log and the summary lines go to $OUT/t-shards.log; a test still running
# after 100 s writes its stacks to $OUT/shards/stacks.log (tests/conftest.py). Processes that share a GPU each see
# 1/PER_GPU of its free memory (a sitecustomize wraps torch.cuda.mem_get_info), so that engines sizing their KV
# cache from free memory at the same moment do not each take 85 % of it.
. bench/session_env.sh
mkdir -p /tmp/shard_site
cat >/tmp/shard_site/sitecustomize.py <<'PY'
import os
share = int(os.environ.get("ACB_SHARD_SHARE", "1"))
if share > 1:
    import torch.cuda
    _info = torch.cuda.mem_get_info
    def _mem_get_info(device=None):
        free, total = _info(device)
        return free // share, total
    torch.cuda.mem_get_info = _mem_get_info
PY
shards=()
for g in ${GPUS:-0}; do for p in $(seq 1 "${PER_GPU:-1}"); do shards+=("$g"); done; done
n=${#shards[@]}
tmp=$(mktemp -d)
python -m pytest --collect-only -q -p no:cacheprovider "$@" 2>/dev/null | grep '::' | tail -n +$((${FROM:-0} + 1)) \
    | awk -v n="$n" -v d="$tmp" '{ print > (d "/ids" (NR - 1) % n) }'
mkdir -p "$OUT/shards"
for i in $(seq 0 $((n - 1))); do
    [ -f "$tmp/ids$i" ] || continue
    (
        mapfile -t ids <"$tmp/ids$i"
        CUDA_VISIBLE_DEVICES=${shards[$i]} ACB_SHARD_SHARE=${PER_GPU:-1} PYTHONPATH="/tmp/shard_site:$PYTHONPATH" \
            ACB_TEST_DUMP_S=100 ACB_TEST_DUMP_DIR="$OUT/shards" timeout "${T_TESTS:-480}" \
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
