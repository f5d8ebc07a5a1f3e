# Sourced by the device-call scripts (bench/*_session.sh): $OUT for what comes back, the project and .gpu_site
# (bench/gpu_site.sh) on PYTHONPATH, the commit for the results, and $log, which starts with the card's name.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu_site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 ACB_COMMIT=${ACB_COMMIT:-unknown}
log="$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$log" 2>&1
# tests/gpu needs pytest-asyncio from .gpu_site; without it pytest stops at collection ("unknown hook
# 'pytest_asyncio_loop_factories'"), which cost session 22 one call's tests: say so first, in the log
python -c "import pytest_asyncio" >/dev/null 2>&1 || echo "!! no pytest_asyncio: build .gpu_site (bash bench/gpu_site.sh) and carry it" >>"$log"
