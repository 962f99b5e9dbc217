#!/usr/bin/env bash
# The checks only a GPU can make, in one run (issue 6): the GPU tests (the CUDA block-copy
# kernels against the torch reference, bit for bit; the HBM tier), the kernel benchmark, and
# the store benchmark's HBM rows on the GPU.
# Written for a machine with a CUDA build of torch, nvcc, pytest, numpy and xxhash already
# installed (the lent GPU machines have them); it installs nothing. The store benchmark also
# needs lmdb and is skipped without it.
#
#     bash tools/gpu_check.sh [OUT_DIR]
#
# Results go to OUT_DIR (default $OUT, else ./gpu-check): nvidia-smi.txt (the device),
# build.log, gpu-tests.log, kernels.md (8 KV heads), kernels-kv2.md (2 KV heads),
# kernels-small.md (256 tokens a call), and store.log with store.json. Each step has its own time limit, so one that hangs leaves the others theirs.
set -uo pipefail
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export KVSTORE_KERNEL_CACHE="${KVSTORE_KERNEL_CACHE:-${TMPDIR:-/tmp}/kvstore-kernels}"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
"$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/nvidia-smi.txt"

# The extension is built once here (timed), so the tests and benchmarks below only load it.
timeout 300 "$python" -c "
import time
from engine_adapters.kernels import cuda
started = time.perf_counter()
cuda.extension()
print(f'built the block-copy kernels in {time.perf_counter() - started:.1f} s at {cuda.build_dir()}')
" 2>&1 | tee "$out/build.log"
build=${PIPESTATUS[0]}

timeout 240 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}

timeout 180 "$python" tools/bench/kernels.py --out "$out/kernels.md"
bench=$?
# Two KV heads per GPU (a GQA model sharded by tensor parallelism): 8 KiB segments, where
# per-block copies pay most for their calls.
timeout 120 "$python" tools/bench/kernels.py --kv-heads 2 --out "$out/kernels-kv2.md"
bench=$((bench || $?))
# A small call (256 tokens: 16 blocks of 16 tokens, one of 256), where per-call work weighs most.
timeout 120 "$python" tools/bench/kernels.py --batch-tokens 256 --out "$out/kernels-small.md"
bench=$((bench || $?))

store=0
if "$python" -c "import lmdb" 2>/dev/null; then
    timeout 180 "$python" tools/bench/store.py --quick --out-json "$out/store.json" --nvme-dir "${TMPDIR:-/tmp}" \
        >"$out/store.log" 2>&1
    store=$?
    tail -n 40 "$out/store.log"
else
    echo "lmdb is not installed: the store benchmark's HBM rows are skipped"
fi
echo "kernel build: exit $build; gpu tests: exit $tests; kernel benchmark: exit $bench; store benchmark: exit $store"
exit $((build || tests || bench || store))
