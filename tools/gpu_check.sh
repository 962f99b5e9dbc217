#!/usr/bin/env bash
# The checks only a GPU can make, in one run (issue 6): the GPU tests (the CUDA block-copy
# kernels against the torch reference, bit for bit; the HBM tier) and the kernel benchmark.
# Written for a machine with a CUDA build of torch, nvcc, pytest, numpy and xxhash already
# installed (the lent GPU machines have them); it installs nothing.
#
#     bash tools/gpu_check.sh [OUT_DIR]
#
# Results go to OUT_DIR (default $OUT, else ./gpu-check): gpu-tests.log, kernels.md, and
# nvidia-smi.txt, the device they ran on.
set -uo pipefail
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
"$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/nvidia-smi.txt"
"$python" -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
"$python" tools/bench/kernels.py --out "$out/kernels.md"
bench=$?
echo "gpu tests: exit $tests; kernel benchmark: exit $bench"
exit $((tests || bench))
