#!/usr/bin/env bash
# One device call on one GPU (issues 16 and 12): where a decode step's GPU time goes, before changing kernels.
#   1. bench.gemm: every llama-8b decode projection alone (cuBLAS, and the Triton split-K candidate for <= 64 rows)
#      against its weight-reading floor, per batch size;
#   2. W-side (32 rows) and W-share with the kernel profile grouped by kind (GEMM, attention, fused small kernels,
#      sampling, other) and GPU time per kind of step.
# Logs and JSON under $OUT. Build and carry .gpu_site (bench/gpu_site.sh) as for the other session scripts.
. bench/session_env.sh
for tp in 1 2; do
    timeout 120 python -m bench.gemm --model llama-8b --tp $tp --rows 1,8,16,32,64,128,256 --json "$OUT/gemm-tp$tp.json" \
        >>"$log" 2>"$OUT/gemm-tp$tp.log"
done
timeout 150 python -m bench.run --no-progress --workloads W-side --modes async --kernels 25 --step-kinds \
    --json "$OUT/side-kernels.json" >"$OUT/side-kernels.log" 2>&1
grep -v "^\[W" "$OUT/side-kernels.log" | head -45 >>"$log"
timeout 200 python -m bench.run --no-progress --workloads W-share --share-scale 0.3 --modes async --kernels 25 \
    --step-kinds --json "$OUT/share-kernels.json" >"$OUT/share-kernels.log" 2>&1
grep -v "^\[W" "$OUT/share-kernels.log" | head -45 >>"$log"
cat "$log"
