#!/usr/bin/env bash
# One device call on a machine of several GPUs that runs independent session scripts side by side, each on its own
# GPUs, so that one machine's start and idle time serve them all:
#   bash bench/side_by_side.sh "0,1|PART=pair bash bench/tp_session.sh" "2|bash bench/decode_session.sh" ...
# Each job (GPUS|command) runs with CUDA_VISIBLE_DEVICES=GPUS and OUT=/tmp/parts-<pid>/<n>; its scripts write their logs and
# JSON there. At the end $OUT/session.log holds every job's session.log one after the other, and $OUT/parts.tgz all
# of their files (a device call returns at most 8 files). Jobs share the host's CPUs: figures measured while another
# job runs name that in their note.
set -u
OUT=${OUT:-/tmp/out}
parts=/tmp/parts-$$
mkdir -p "$OUT" $parts
i=0
for job in "$@"; do
    i=$((i + 1))
    mkdir -p "$parts/$i"
    echo "$job" >"$parts/$i/job.txt"
    (CUDA_VISIBLE_DEVICES=${job%%|*} OUT=$parts/$i bash -c "${job#*|}" >"$parts/$i/stdout.log" 2>&1) &
done
wait
for d in $parts/*/; do
    { echo "######## $(cat "$d/job.txt")"; cat "$d/session.log" 2>/dev/null || tail -30 "$d/stdout.log"; } >>"$OUT/session.log"
done
tar czf "$OUT/parts.tgz" -C $parts .
cat "$OUT/session.log"
