#!/usr/bin/env bash
# One device call on one GPU (issues 16, 17, 12): bench.chain (a decode step's chain of GEMMs and small kernels:
# cuBLAS, Triton, Triton under PDL, fused norms under PDL; TP=1 and TP=2 shapes), then W-serve's HTTP rows
# (bench/serving_session.sh step 4 with VIA=http, which writes $OUT/session.log). Carry .gpu_site (bench/gpu_site.sh).
. bench/session_env.sh
timeout "${T_CHAIN:-240}" python -m bench.chain --tp 1,2 --rows 8,32 --json "$OUT/chain.json" >"$OUT/chain.log" 2>&1
if [ -n "${SERVE:-1}" ]; then
    VIA=${VIA:-http} RATES=${RATES:-16,32,64,inf} STEPS=4 T4=${T4:-320} bash bench/serving_session.sh >/dev/null
    cat "$OUT/session.log"
fi
grep -v "^\[W" "$OUT/chain.log" | tail -45
