#!/usr/bin/env bash
# One device call: the CUDA tests (TESTS: which files, all of tests/gpu by default), then the given bench.run arguments (each a quoted argument list), logs under $OUT.
#   bash bench/gpu_session.sh "--workloads W-small --modes async,sync --json \$OUT/small.json" ...
# pytest-asyncio is not on the card's image: carry its unzipped wheel as .gpu_site (see shared/gpu.md).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu_site:${PYTHONPATH:-}" ACB_COMMIT=${ACB_COMMIT:-unknown}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout ${TEST_TIMEOUT:-300} python -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/gpu} 2>&1 | tail -25 | tee "$OUT/gpu-tests.log"
fi
i=0
for args in "$@"; do
    i=$((i + 1))
    eval "timeout ${BENCH_TIMEOUT:-400} python -m bench.run --no-progress $args" 2>&1 | grep -v "^\s*$" | tail -40 \
        | tee "$OUT/bench-$i.log"
done
