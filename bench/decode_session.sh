#!/usr/bin/env bash
# One device call on one GPU (issues 16 and 17): where a decode step's GPU time goes, before changing kernels.
#   1. bench.chain: 32 layers of a decode step's GEMMs and small kernels in one CUDA graph, cuBLAS against Triton
#      GEMMs with and without programmatic dependent launch (early or late trigger), TP=1 and TP=2 shapes;
#   2. (GEMM=1) bench.gemm: every llama-8b decode projection alone against its weight-reading floor (measured on an
#      H200 on 2026-11-27, docs/benchmarks.md);
#   3. (unless PROFILES=0) W-side and W-share with the kernel profile grouped by kind and GPU time per kind of step.
# Logs and JSON under $OUT. Build and carry .gpu_site (bench/gpu_site.sh) as for the other session scripts.
. bench/session_env.sh
timeout 200 python -m bench.chain --tp 1,2 --rows 8,32 --json "$OUT/chain.json" >"$OUT/chain.log" 2>&1
grep -v "^\[W" "$OUT/chain.log" | tail -40 >>"$log"
if [ -n "${GEMM:-}" ]; then
    for tp in 1 2; do
        timeout 120 python -m bench.gemm --model llama-8b --tp $tp --rows 1,8,16,32,64,128,256 \
            --json "$OUT/gemm-tp$tp.json" >>"$log" 2>"$OUT/gemm-tp$tp.log"
    done
fi
if [ "${PROFILES:-1}" = 0 ]; then
    cat "$log"
    exit 0
fi
timeout 150 python -m bench.run --no-progress --workloads W-side --modes async --kernels 25 --step-kinds \
    --json "$OUT/side-kernels.json" >"$OUT/side-kernels.log" 2>&1
grep -v "^\[W" "$OUT/side-kernels.log" | head -45 >>"$log"
timeout 200 python -m bench.run --no-progress --workloads W-share --share-scale 0.3 --modes async --kernels 25 \
    --step-kinds --json "$OUT/share-kernels.json" >"$OUT/share-kernels.log" 2>&1
grep -v "^\[W" "$OUT/share-kernels.log" | head -45 >>"$log"
cat "$log"
