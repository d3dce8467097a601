#!/usr/bin/env bash
# There (the lent GPU machine, run in the repository root by the device tool):
#   bash gpu/check.sh receive   keep this call's carried part of the wheels (all but the last)
#   bash gpu/check.sh run       the last part: install MAX, then `pytest -m gpu` and the
#                               benchmark on the GPU; logs to $OUT (gpu-tests.log, gpu-bench.log)
# The machine stays warm ~30 s between calls, so call back to back. Budget: about 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=/tmp/batchgen-wheel-parts
OUT="${OUT:-/tmp/batchgen-gpu-out}"
mkdir -p "$PARTS" "$OUT"
cp .gpu-wheels/part-*/wheels.tar.part-* "$PARTS"/ 2>/dev/null
echo "parts held: $(ls "$PARTS" | tr '\n' ' ')"
[ "${1:-}" = receive ] && exit 0

set -e
SITE=/tmp/batchgen-site
rm -rf "$SITE" /tmp/batchgen-wheels && mkdir -p /tmp/batchgen-wheels
cat "$PARTS"/wheels.tar.part-* | tar -C /tmp/batchgen-wheels -xf -
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  /tmp/batchgen-wheels/wheels/*.whl
export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
python3 -c "from max.driver import accelerator_count as n; print('accelerators:', n()); assert n()"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
start=$(date +%s)
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log"
echo "tests: $(( $(date +%s) - start )) s"
timeout 240 python3 -m batchgen bench --device gpu --workloads uniform,step,mixed,long \
  --repeats 2 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/gpu-bench.log"
echo "tests and benchmark: $(( $(date +%s) - start )) s"
