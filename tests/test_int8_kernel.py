"""Int8 weight-only layers: qwen's AVX-512 kernel, PyTorch's kernel, the dequantized path, and the
fallback when qwen's kernel cannot be built.

qwen's kernel is compiled on first use (about 15 s, then cached like any user's build); its tests
run where the CPU has AVX-512 and are skipped, visibly, elsewhere.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from qwen.engine import Engine
from qwen.quantize import INT8_KERNEL_MAX_ROWS, Int8Linear, quantize_int8_, quantize_rows, qwen_int8_kernel
from qwen.sampling import SamplingParams

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
needs_avx512 = pytest.mark.skipif(not AVX512, reason="qwen's int8 kernel needs an AVX-512 CPU")


@pytest.fixture(scope="module")
def kernel():
    if not AVX512:
        pytest.skip("qwen's int8 kernel needs an AVX-512 CPU")
    op = qwen_int8_kernel()
    assert op is not None, "qwen's int8 kernel did not build on an AVX-512 machine (see the warning)"
    return op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_block_by_block_equals_whole_matrix_formula(dtype):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(1000, 48, generator=g) * torch.rand(1000, 1, generator=g)).to(dtype)
    w[7] = 0  # an all-zero row gets the smallest scale, not a division by zero
    original = w.clone()
    q, scale = quantize_rows(w, block_rows=64)  # 15 full blocks and a partial one
    full = w.float()
    expected_scale = (full.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, torch.round(full / expected_scale[:, None]).clamp(-128, 127).to(torch.int8))
    assert torch.equal(w, original)  # the caller's weight is untouched
    assert q.abs().amax(dim=1)[torch.arange(1000) != 7].eq(127).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_float64_reference(kernel, dtype):
    """Every row-block size (1-8 and past 8), widths with and without a 64-byte tail, odd outputs."""
    g = torch.Generator().manual_seed(0)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for rows in (1, 2, 3, 5, 7, 8, 9, 16, 17, 33):
        for width in (5, 64, 100, 256):
            for outputs in (1, 3, 130):
                x = torch.randn(rows, width, generator=g).to(dtype)
                w = torch.randint(-128, 128, (outputs, width), generator=g, dtype=torch.int8)
                scales = torch.rand(outputs, generator=g).to(dtype)
                got = kernel(x, w, scales)
                expected = (x.double() @ w.double().T) * scales.double()
                assert got.dtype == dtype and got.shape == (rows, outputs)
                error = (got.double() - expected).abs().max() / expected.abs().max()
                assert error < tolerance, (rows, width, outputs, error.item())


def test_kernel_takes_strided_activations(kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 4, generator=g).T  # 4 rows of 70, not contiguous
    w = torch.randint(-128, 128, (9, 70), generator=g, dtype=torch.int8)
    scales = torch.rand(9, generator=g)
    assert not x.is_contiguous()
    torch.testing.assert_close(kernel(x, w, scales), (x @ w.float().T) * scales, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_shapes(kernel):
    w = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernel(torch.zeros(1, 9), w, torch.ones(3))
    with pytest.raises(RuntimeError, match="int8"):
        kernel(torch.zeros(1, 8), w.float(), torch.ones(3))


@pytest.mark.parametrize("kernel_name", [pytest.param("qwen", marks=needs_avx512), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_kernel_and_dequantized_paths_agree(kernel_name, dtype):
    """Few rows run an int8 kernel, many rows a dequantized matmul: all compute x @ (q * s).T + b."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 40).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=g))
    layer = Int8Linear(linear, kernel=kernel_name)
    assert layer.use_qwen_kernel == (kernel_name == "qwen")
    reference_weight = layer.weight.float() * layer.scales.float()[:, None]
    x = torch.randn(3, INT8_KERNEL_MAX_ROWS + 5, 96, generator=g).to(dtype)  # 111 rows: the dequantized path
    with torch.no_grad():
        many = layer(x).float()
        few = torch.cat([layer(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1).float()  # the kernel
    expected = x.float() @ reference_weight.T + linear.bias.float()
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    assert few.shape == many.shape == expected.shape
    assert (few - expected).abs().max() < tolerance * expected.abs().max()
    assert (many - expected).abs().max() < tolerance * expected.abs().max()


@needs_avx512
def test_engine_gives_the_same_tokens_with_either_kernel(tiny_model, tokenizer):
    """... also in the engine's compiled decode step, which traces qwen's op through its shape function."""
    prompts = [tokenizer.encode(t) for t in ("Hello", "a b c d e f", "你好，世界")]
    params = SamplingParams(max_new_tokens=8, do_sample=False)
    outputs = {}
    for name, compile in (("qwen", False), ("torch", False), ("qwen", True)):
        model = quantize_int8_(copy.deepcopy(tiny_model), kernel=name)
        assert all(m.use_qwen_kernel == (name == "qwen") for m in model.modules() if isinstance(m, Int8Linear))
        engine = Engine(model, tokenizer, compile=compile)
        outputs[name, compile] = [seq.output_ids for seq in engine.generate(prompts, params)]
    assert outputs["qwen", False] == outputs["torch", False] == outputs["qwen", True]


def run_python(code: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (the kernel is loaded once per process) with a clean build folder."""
    full_env = {k: v for k, v in os.environ.items() if k != "QWEN_INT8_KERNEL"}
    full_env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "build"), **env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


FALLBACK = """
import torch
from qwen.quantize import Int8Linear, qwen_int8_kernel
print("kernel", qwen_int8_kernel())
layer = Int8Linear(torch.nn.Linear(70, 9))
x = torch.randn(2, 70)
expected = x @ (layer.weight.float() * layer.scales[:, None]).T + layer.bias
print("qwen kernel used", layer.use_qwen_kernel, "close", torch.allclose(layer(x), expected, atol=1e-4))
"""


@needs_avx512
def test_a_failed_build_warns_and_falls_back_to_torchs_kernel(tmp_path):
    done = run_python(FALLBACK, tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert done.returncode == 0, done.stderr
    assert "kernel None" in done.stdout and "qwen kernel used False close True" in done.stdout
    assert "building qwen's int8 CPU kernel in " + str(tmp_path / "build") in done.stderr
    assert "could not build qwen's int8 CPU kernel" in done.stderr and "apt install g++" in done.stderr
    assert "no-such-compiler" in done.stderr  # the warning keeps the end of the build log: the cause


def test_env_var_selects_torchs_kernel_and_qwen_kernel_request_fails_clearly(tmp_path):
    code = FALLBACK + """
try:
    Int8Linear(torch.nn.Linear(70, 9), kernel="qwen")
except RuntimeError as exc:
    print("error:", exc)
"""
    done = run_python(code, tmp_path, QWEN_INT8_KERNEL="torch")
    assert done.returncode == 0, done.stderr
    assert "kernel None" in done.stdout and "qwen kernel used False close True" in done.stdout
    assert "error: kernel='qwen' needs an AVX-512 CPU and a C++ toolchain" in done.stdout
    assert not (tmp_path / "build").exists()  # nothing was compiled
