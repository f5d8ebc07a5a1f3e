# Sourced by the device-call scripts (bench/*_session.sh): $OUT for what comes back, the project and .gpu_site
# (bench/gpu_site.sh) on PYTHONPATH, the commit for the results, and $log, which starts with the card's name.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu_site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 ACB_COMMIT=${ACB_COMMIT:-unknown}
log="$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$log" 2>&1
