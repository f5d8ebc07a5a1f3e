#!/usr/bin/env bash
# One device call on one GPU for issue 16 (model families). PART picks what runs (each fits one 10-minute call):
#   PART=tests (default): the decode kernel's tests in bf16 and fp32 (q/k norms, rotary, the cache write, 1-9 splits),
#                         then every family's greedy == generate with graphs (tests/gpu/test_families_cuda.py);
#   PART=table:           python -m bench.families: W-family for each family, lean then generic path, with the
#                         table against each family's weight-reading floor (about 6-8 minutes on an H200).
# Logs and JSON under $OUT. Build and carry .gpu_site (bench/gpu_site.sh) as for the other session scripts.
. bench/session_env.sh
case "${PART:-tests}" in
tests)
    timeout 240 python -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py \
        -k "decode or qk_norm or new_kv or rotary_equals" >"$OUT/t-kernels.log" 2>&1
    echo "== kernels: $(tail -1 "$OUT/t-kernels.log")" >>"$log"
    grep -E "^FAILED|Error" "$OUT/t-kernels.log" | head -8 >>"$log"
    timeout 300 python -m pytest -q -p no:cacheprovider tests/gpu/test_families_cuda.py -k graphs \
        >"$OUT/t-families.log" 2>&1
    echo "== families -k graphs: $(tail -1 "$OUT/t-families.log")" >>"$log"
    grep -E "^FAILED|Error" "$OUT/t-families.log" | head -8 >>"$log"
    ;;
table)
    mkdir -p "$OUT/families"
    timeout 560 python -m bench.families --out "$OUT/families" >"$OUT/families.log" 2>&1
    echo "== bench.families rc=$?" >>"$log"
    tail -12 "$OUT/families.log" >>"$log"
    ;;
*)
    echo "PART is tests or table" >>"$log"
    ;;
esac
cat "$log"
