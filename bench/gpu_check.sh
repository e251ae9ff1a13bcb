#!/usr/bin/env bash
# The checks to run on a machine with a CUDA GPU: tests/test_cuda.py, then bench/generate.py on the GPU
# (1.8B shape, bf16, with the compiled decode step). Logs go to $OUT (default ./gpu-check).
#     bash bench/gpu_check.sh
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())" 2>&1 | tee "$out/env.log"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.log"
TORCH_LOGS=perf_hints,recompiles timeout "${BENCH_TIMEOUT:-330}" python3 bench/generate.py --device cuda --compile \
    --shape 1.8b --new-tokens 64 --rounds 2 2>&1 | tee "$out/bench.log"
