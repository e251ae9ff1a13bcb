#!/usr/bin/env bash
# The checks to run on a machine with a CUDA GPU, in one call of a few minutes: tests/test_cuda.py, then
# bench/gpu_profile.py (the 1.8B shape in bf16: one layer's matmul per weight format, the compiled decode
# step before and after issue #20's changes with its kernel breakdown, int8 and int4, transformers' Qwen2
# on the same weights, prefill and window prefill), then bench/vllm_check.py (skips without vLLM).
# Logs go to $OUT (default ./gpu-check).
#     bash bench/gpu_check.sh
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
# QWEN_TRITON_INT8=1: the opt-in Triton int8 kernel is what these checks are for.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 QWEN_TRITON_INT8=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())" 2>&1 | tee "$out/env.log"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda.py 2>&1 \
    | tee "$out/tests.log"
timeout "${BENCH_TIMEOUT:-300}" python3 bench/gpu_profile.py 2>&1 | tee "$out/profile.log"
if [ -f bench/vllm_check.py ]; then
    timeout "${VLLM_TIMEOUT:-120}" python3 bench/vllm_check.py 2>&1 | tee "$out/vllm.log"
fi
