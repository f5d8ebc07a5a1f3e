#!/usr/bin/env bash
# One device call on one GPU (issue 12); logs and JSON under $OUT (at most 8 files come back). Correctness first:
#   1. tests/gpu/test_engine_cuda.py -k mixed: greedy == generate with the mixed-step graphs, both overlap modes;
#   2. cold start: a fresh process's first W-side batch against a warm engine's (bench.coldstart, warm-up off / on);
#   3. W-share: plain, mixed-step graphs, mixed-step graphs with prefill_chunk_tokens=512 (async), and sync;
#   4. W-serve through the engine and HTTP (CONFIG: EngineConfig overrides; mixed graphs off, as measured;
#      API_PROCESSES=N: the server in N processes of its own, STREAM_INTERVAL=N: tokens per write).
# All four take more than one call's 10 minutes: STEPS="3 2 1" (run in that order; T1..T4 bound each, seconds) in a
# first call, STEPS=4 in a second.
# pytest-asyncio, fastapi, uvicorn and httpx are not on the card's image: build .gpu_site with bench/gpu_site.sh and
# carry it (see shared/gpu.md).
. bench/session_env.sh
step() {
    case $1 in
    1) timeout "${T1:-240}" python -m pytest -v -p no:cacheprovider --durations=8 tests/gpu/test_engine_cuda.py -k mixed \
        >"$OUT/t-mixed.log" 2>&1
       grep -E "passed|failed|PASSED|FAILED|ERROR" "$OUT/t-mixed.log" | tail -9 >>"$log" ;;
    2) timeout "${T2:-300}" python -m bench.coldstart --runs off,on --out "$OUT/coldstart.json" 2>&1 | tail -8 >>"$log" ;;
    3) timeout "${T3:-420}" python -m bench.run --no-progress --workloads W-share --json "$OUT/share.json" \
        --modes "async,async[mixed_graphs=true],async[mixed_graphs=true,prefill_chunk_tokens=512],sync" \
        >"$OUT/share.log" 2>&1
       grep "^| W-share\|idle\|Error" "$OUT/share.log" | tail -8 >>"$log" ;;
    4) timeout "${T4:-560}" python -m bench.serve --rates ${RATES:-8,16,32,48,64,inf} --via ${VIA:-engine,http} \
        --config "${CONFIG:-mixed_graphs=false}" --stream-interval "${STREAM_INTERVAL:-1}" \
        --api-processes "${API_PROCESSES:-0}" --json "$OUT/serve.json" --markdown "$OUT/serve.md" \
        --plot "$OUT/serve.png" 2>&1 | tail -12 >>"$log" ;;
    esac
}
for s in ${STEPS:-1 2 3 4}; do  # in the order given
    echo "== step $s ($(date +%T))" >>"$log"
    step "$s"
done
cat "$log"
