#!/usr/bin/env bash
# One device call on one GPU (issue 12); logs and JSON under $OUT (at most 8 files come back). Correctness first:
#   1. tests/gpu/test_engine_cuda.py -k mixed: greedy == generate with the mixed-step graphs, both overlap modes;
#   2. cold start: a fresh process's first W-side batch against a warm engine's (bench.coldstart, warm-up off / on);
#   3. W-share: plain, mixed-step graphs, mixed-step graphs with prefill_chunk_tokens=512 (async), and sync;
#   4. W-serve through the engine and HTTP, with the best of 3 (CONFIG, default mixed_graphs=true).
# All four take more than one call's 10 minutes: STEPS="1 2 3" in a first call, STEPS=4 in a second.
# pytest-asyncio is not on the card's image: carry its unzipped wheel as .gpu_site (see shared/gpu.md).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu_site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 ACB_COMMIT=${ACB_COMMIT:-unknown}
log="$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$log" 2>&1
has() { case " ${STEPS:-1 2 3 4} " in *" $1 "*) return 0 ;; esac; return 1; }
has 1 && timeout 240 python -m pytest -q -p no:cacheprovider tests/gpu/test_engine_cuda.py -k mixed 2>&1 | tail -5 >>"$log"
has 2 && timeout 300 python -m bench.coldstart --runs off,on --out "$OUT/coldstart.json" 2>&1 | tail -8 >>"$log"
has 3 && timeout 420 python -m bench.run --no-progress --workloads W-share --json "$OUT/share.json" \
    --modes "async,async[mixed_graphs=true],async[mixed_graphs=true,prefill_chunk_tokens=512],sync" 2>&1 \
    | grep "^| W-share\|idle\|Error" | tail -8 >>"$log"
has 4 && timeout 560 python -m bench.serve --rates 4,8,16,32,inf --via engine,http --config "${CONFIG:-mixed_graphs=true}" \
    --json "$OUT/serve.json" --markdown "$OUT/serve.md" --plot "$OUT/serve.png" 2>&1 | tail -12 >>"$log"
cat "$log"
