"""Int8 weight-only layers and qwen's AVX-512 block kernel (int8 and 4-bit weights in blocks of 32, see
qwen/csrc/block_matvec.cpp): PyTorch's kernel, the dequantized path, and the fallback when qwen's kernel cannot
be built.

qwen's kernel is compiled on first use (about 15 s, then cached like any user's build); its tests
run where the CPU has AVX-512 and are skipped, visibly, elsewhere. It has two paths:
fp32 ("float") and, on CPUs with AVX-512 VNNI, int8 activations ("integer"); the kernel reads
QWEN_INT8_VNNI on each call, so the ``path`` fixture runs a test on each of them.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwen.engine import Engine
from qwen.quantization.layers import integer_prompts, pack_blocks, unpack_blocks
from qwen.quantize import Int8Linear, dequantize_blocks, quantize_blocks, quantize_int8_, qwen_int8_kernel
from qwen.sampling import SamplingParams

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
needs_avx512 = pytest.mark.skipif(not AVX512, reason="qwen's int8 kernel needs an AVX-512 CPU")


def cpu_flags() -> set[str]:
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


VNNI = AVX512 and "avx512_vnni" in cpu_flags()
BLOCK = 32  # input channels per weight scale, and per activation scale on the integer path


@pytest.fixture(scope="module")
def kernel():
    """qwen's kernel, called as the layer calls it: ``w`` [N, K] in channel order (packed here), int8 or 4-bit
    values (uint8 0..15, weight q - 8), and one scale per block of 32 (``scales`` [N, ceil(K / 32)], rounded to
    bf16 as the layers store them)."""
    if not AVX512:
        pytest.skip("qwen's int8 kernel needs an AVX-512 CPU")
    op = qwen_int8_kernel()
    assert op is not None, "qwen's int8 kernel did not build on an AVX-512 machine (see the warning)"
    return lambda x, w, scales: op(x, pack_blocks(w, 8 if w.dtype == torch.int8 else 4), scales.bfloat16())


@pytest.fixture(params=["float", "integer"])
def path(request, kernel, monkeypatch):
    """The kernel's path (QWEN_INT8_VNNI: on CPUs with VNNI the integer one serves every row count)."""
    if request.param == "integer" and not VNNI:
        pytest.skip("the integer path needs a CPU with AVX-512 VNNI")
    monkeypatch.setenv("QWEN_INT8_VNNI", "1" if request.param == "integer" else "0")
    return request.param


def blocks_of(t: torch.Tensor) -> torch.Tensor:
    """t [rows, K] zero-padded to whole blocks: [rows, blocks, BLOCK]."""
    return F.pad(t, (0, -t.shape[1] % BLOCK)).view(t.shape[0], -1, BLOCK)


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as the integer path quantizes it: q [M, blocks, BLOCK] and a [M, blocks] with x ~ a * q,
    a = max|x| / 127 and q = round-half-even(x * (127 / max|x|)) per block, all in fp32 as the kernel
    computes them (an all-zero block: a = 0, q = 0)."""
    blocks = blocks_of(x.float())
    top = blocks.abs().amax(-1)
    inv = torch.full_like(top, 127) / top  # a division, as the kernel's (127 / top is 127 * (1 / top))
    inv = torch.where(inv.isfinite(), inv, 0)
    return torch.round(blocks * inv[..., None]), top / 127


def weight(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float64 weight [N, K] the kernel multiplies: w (int8, or uint8 4-bit values minus 8) times its blocks'
    bf16 scales."""
    return dequantize_blocks(w, scales.bfloat16(), torch.float64)


def integer_reference(x, w, scales) -> torch.Tensor:
    """What the integer path computes, in float64: the product with the quantized activations."""
    q, a = quantized_activations(x)
    xq = (q.double() * a.double()[..., None]).flatten(1)[:, : x.shape[1]]
    return xq @ weight(w, scales).T


def activation_error_bound(x, full_weight) -> torch.Tensor:
    """How far 8-bit activations can move each output [M, N] of x @ full_weight.T: every x is off by at most
    a / 2 of its block, so |error[m, n]| <= sum_b a[m, b] / 2 * sum_(i in b) |W[n, i]|."""
    _, a = quantized_activations(x)
    return (a.double() / 2) @ blocks_of(full_weight.double()).abs().sum(-1).T


def assert_matches_reference(got, x, w, scales, path):
    """The float path: the exact product up to fp32 rounding (1e-5 of the largest output) and the output
    dtype's own rounding. The integer path: that, against the same product of the
    quantized activations, and within activation_error_bound of the exact product."""
    expected = x.double() @ weight(w, scales).T
    got = got.double()
    eps = torch.finfo(x.dtype).eps
    if path == "float":
        slack = 1e-5 * expected.abs().max() + eps * expected.abs()
        assert ((got - expected).abs() <= slack).all(), ((got - expected).abs() / slack).max().item()
        return
    quantized = integer_reference(x, w, scales)
    slack = 1e-5 * quantized.abs().max() + eps * quantized.abs()
    assert ((got - quantized).abs() <= slack).all(), ((got - quantized).abs() / slack).max().item()
    bound = activation_error_bound(x, weight(w, scales)) * 1.001 + 1e-5 * expected.abs().max() + eps * expected.abs()
    assert ((got - expected).abs() <= bound).all(), ((got - expected).abs() / bound).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_blocks_follows_the_formula_row_block_by_row_block(dtype):  # 8 bits; 4: test_int4.py
    """One bf16 scale per 32 input channels (max|w| / 127, rounded), q rounded against the rounded scale; the same
    with one scale per row; the packed layout unpacks to the same q; the caller's weight untouched."""
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(1000, 100, generator=g) * torch.rand(1000, 1, generator=g)).to(dtype)  # a short last block
    w[7] = 0  # an all-zero row gets the smallest scale, not a division by zero
    original = w.clone()
    for block in (BLOCK, 100):
        q, scale = quantize_blocks(w, block, block_rows=64)  # 15 full row blocks and a partial one
        full = blocks_of(w.float()) if block == BLOCK else w.float()[:, None, :]
        expected_scale = (full.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny).bfloat16()
        assert torch.equal(scale, expected_scale)
        expected_q = torch.round(full / expected_scale.float()[..., None]).clamp(-127, 127).flatten(1)[:, :100]
        assert torch.equal(q, expected_q.to(torch.int8))
        assert q.abs().amax(dim=1)[torch.arange(1000) != 7].ge(126).all()
    packed, packed_scale = quantize_blocks(w, packed=True)
    assert packed.shape == (1000, 128) and torch.equal(packed_scale, quantize_blocks(w)[1])
    assert torch.equal(unpack_blocks(packed, 100), quantize_blocks(w)[0])
    assert torch.equal(w, original)  # the caller's weight is untouched


def test_the_packed_layout_puts_a_block_in_each_lane():
    """Channel 32 l + 4 j + t of a group of G blocks sits at byte 4 G j + 4 l + t (see block_matvec.cpp): a full
    group of 16 blocks and a short last one of 2."""
    channels = torch.arange(18 * BLOCK)[None, :]
    packed = pack_blocks(channels)
    for c in (0, 1, 4, 31, 32, 100, 511):  # in the first group, G = 16
        lane, j, t = c // 32, c % 32 // 4, c % 4
        assert packed[0, 64 * j + 4 * lane + t] == c
    for c in (512, 545, 575):  # the last group, G = 2
        lane, j, t = (c - 512) // 32, c % 32 // 4, c % 4
        assert packed[0, 512 + 8 * j + 4 * lane + t] == c
    assert torch.equal(unpack_blocks(packed, 18 * BLOCK), channels)


def random_weights(outputs: int, width: int, bits: int, g: torch.Generator) -> torch.Tensor:
    if bits == 8:
        return torch.randint(-127, 128, (outputs, width), generator=g, dtype=torch.int8)
    return torch.randint(0, 16, (outputs, width), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_float64_reference(kernel, path, dtype, bits):
    """Every row-block size (1-8 and past 8), widths with short blocks, short groups of blocks and several
    groups, odd outputs. On the integer path 8-bit activations move these random outputs by about 1% of the
    largest one, within their worst case."""
    g = torch.Generator().manual_seed(0)
    for rows in (1, 2, 3, 5, 7, 8, 9, 16, 17, 33):
        for width in (5, 64, 100, 128, 200, 544, 600, 1100):
            for outputs in (1, 3, 130):
                x = torch.randn(rows, width, generator=g).to(dtype)
                w = random_weights(outputs, width, bits, g)
                scales = torch.rand(outputs, -(-width // BLOCK), generator=g) - 0.5  # 4 bits: scales of either sign
                got = kernel(x, w, scales)
                assert got.dtype == dtype and got.shape == (rows, outputs)
                assert_matches_reference(got, x, w, scales, path)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weight_is_the_packed_weight_times_its_scales(kernel, bits):
    """block_dequantize (a prompt's weight) gives each weight times its block's scale in the packed channel
    order, in fp32 exactly and in bf16 rounded once; activations packed the same way meet it in a matmul."""
    g = torch.Generator().manual_seed(7)
    w, scales = random_weights(40, 600, bits, g), torch.rand(40, 19, generator=g).bfloat16()
    packed = pack_blocks(w, bits)
    full = weight(w, scales)
    got = torch.ops.qwen.block_dequantize(packed, scales, torch.float32)
    assert got.shape == (40, 608) and torch.equal(got.double(), pack_blocks(full))
    assert torch.equal(torch.ops.qwen.block_dequantize(packed, scales, torch.bfloat16), got.bfloat16())
    x = torch.randn(3, 600, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pack_blocks(x) @ got.double().T, x @ full.T)


def test_rows_are_computed_independently(kernel, path):
    """A row's output does not depend on the rows beside it (it has its own scales on the integer
    path): an all-zero row gives zeros, and the other rows come out as they do without it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 300, generator=g)
    x[2] = 0
    w = torch.randint(-127, 128, (70, 300), generator=g, dtype=torch.int8)
    scales = torch.rand(70, 10, generator=g)
    got = kernel(x, w, scales)
    assert torch.equal(got[2], torch.zeros(70))
    assert torch.equal(got[[0, 1, 3, 4]], kernel(x[[0, 1, 3, 4]], w, scales))
    assert_matches_reference(got, x, w, scales, path)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_rows_output_does_not_depend_on_how_many_rows_come_with_it(kernel, path, bits):
    """At a real width (5504 channels: 11 groups, swept in parts) a row's output is the same to the bit alone and
    in passes of any size, so a decode step's output for a sequence does not depend on its batch; on the integer
    path from 24 rows the kernel multiplies as a matrix product (panels of 32 outputs: 40 leaves a short one) and
    gives each row the same bits as the row alone."""
    g = torch.Generator().manual_seed(12)
    x, w = torch.randn(41, 5504, generator=g), random_weights(40, 5504, bits, g)
    scales = torch.rand(40, 172, generator=g)
    full = kernel(x, w, scales)
    for rows in (1, 3, 8, 9, 17, 23, 24, 25, 30):
        assert torch.equal(kernel(x[:rows], w, scales), full[:rows])
    assert all(torch.equal(kernel(x[i : i + 1], w, scales)[0], full[i]) for i in range(41))


def test_a_non_finite_activation_gives_non_finite_outputs(kernel, path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 300, generator=g)
    x[0, 5], x[1, 200] = float("nan"), float("inf")
    w = torch.randint(-127, 128, (9, 300), generator=g, dtype=torch.int8)
    got = kernel(x, w, torch.rand(9, 10, generator=g))
    assert not got[:2].isfinite().any() and got[2].isfinite().all()


def test_integer_path_keeps_an_outlier_channel_to_its_block(kernel, monkeypatch):
    """One large channel (x[:, 7] = 100, 24x the others' largest) coarsens the 8-bit steps of its own
    block of 32 channels only: outputs that read the other blocks stay as accurate as without it
    (0.5% of the largest), where one scale per row would be off by 23%."""
    if not VNNI:
        pytest.skip("the integer path needs a CPU with AVX-512 VNNI")
    monkeypatch.setenv("QWEN_INT8_VNNI", "1")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 1024, generator=g)
    x[:, 7] = 100
    w = torch.randint(-127, 128, (64, 1024), generator=g, dtype=torch.int8)
    scales = torch.ones(64, 32)
    assert_matches_reference(kernel(x, w, scales), x, w, scales, "integer")
    w[:, :BLOCK] = 0  # outputs that read blocks 1-31 only
    expected = x.double() @ weight(w, scales).T
    error = (kernel(x, w, scales).double() - expected).abs().max() / expected.abs().max()
    row_scale = x.abs().amax(1, keepdim=True) / 127
    one_scale_per_row = (torch.round(x / row_scale) * row_scale).double() @ weight(w, scales).T
    row_error = (one_scale_per_row - expected).abs().max() / expected.abs().max()
    assert error < 1e-2 and row_error > 0.1, (error.item(), row_error.item())


def test_kernel_takes_strided_activations(kernel, path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 4, generator=g).T  # 4 rows of 70, not contiguous
    w = torch.randint(-127, 128, (9, 70), generator=g, dtype=torch.int8)
    scales = torch.rand(9, 3, generator=g)
    assert not x.is_contiguous()
    assert_matches_reference(kernel(x, w, scales), x, w, scales, path)


def test_kernel_rejects_bad_shapes(kernel):
    op = qwen_int8_kernel()
    w, scales = torch.zeros(3, 32, dtype=torch.int8), torch.ones(3, 1, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        op(torch.zeros(1, 40), w, scales)  # 40 channels are 2 blocks
    with pytest.raises(RuntimeError, match="int8"):
        op(torch.zeros(1, 8), w.float(), scales)
    with pytest.raises(RuntimeError, match="bf16"):
        op(torch.zeros(1, 8), w, scales.float())


@pytest.mark.parametrize("kernel_name", [pytest.param("qwen", marks=needs_avx512), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_kernel_and_dequantized_paths_agree(kernel_name, dtype):
    """Decode steps run an int8 kernel, a prompt's tokens a dequantized matmul or (qwen's kernel where
    ``integer_prompts``) the kernel's integer product: all compute x @ (q * s).T + b."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 40).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=g))
    layer = Int8Linear(linear, kernel=kernel_name)
    assert layer.use_qwen_kernel == (kernel_name == "qwen")
    assert layer.scales.shape == ((40, 3) if kernel_name == "qwen" else (40, 1))  # blocks of 32 / one per row
    reference_weight = layer.dequantize()
    x = torch.randn(3, 37, 96, generator=g).to(dtype)  # 3 prompts of 37 tokens: the dequantized path
    with torch.no_grad():
        many = layer(x).float()
        few = torch.cat([layer(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1).float()  # the kernel
    expected = x.float() @ reference_weight.T + linear.bias.float()
    tolerance = (1e-4 if dtype == torch.float32 else 0.1) * expected.abs().max()
    assert few.shape == many.shape == expected.shape
    integer = kernel_name == "qwen" and VNNI  # 3 rows a call: the integer path, with 8-bit activations
    if integer:
        tolerance = tolerance + activation_error_bound(x.reshape(-1, 96), reference_weight).view(few.shape)
    assert ((few - expected).abs() < tolerance).all()
    assert ((many - expected).abs() < tolerance).all()
    if integer and integer_prompts(dtype):  # the prompt on the integer product: the decode steps' bits
        assert torch.equal(many, few)


@needs_avx512
def test_engine_with_qwens_kernel_eager_compiled_and_against_pytorchs(tiny_model, tokenizer):
    """qwen's kernel gives the same tokens in the engine's eager and compiled decode steps (the compiled
    step traces qwen's op through its shape function). PyTorch's kernel takes the activations as they
    are, qwen's integer path rounds them to 8 bits: decoded one token at a time, the
    logits agree to about 1% of their norm (3% allowed; a broken kernel is off by 100%), and the tokens
    may differ, as this random model's top two logits can be closer than that."""
    prompts = [tokenizer.encode(t) for t in ("Hello", "a b c d e f", "你好，世界")]
    params = SamplingParams(max_new_tokens=8, do_sample=False)
    models = {name: quantize_int8_(copy.deepcopy(tiny_model), kernel=name) for name in ("qwen", "torch")}
    assert all(m.use_qwen_kernel for m in models["qwen"].modules() if isinstance(m, Int8Linear))
    assert not any(m.use_qwen_kernel for m in models["torch"].modules() if isinstance(m, Int8Linear))
    tokens = {}
    for compile in (False, True):
        engine = Engine(copy.deepcopy(models["qwen"]), tokenizer, compile=compile)
        tokens[compile] = [seq.output_ids for seq in engine.generate(prompts, params)]
    assert tokens[False] == tokens[True] and all(len(ids) == 8 for ids in tokens[False])
    ids = torch.tensor([prompts[1]])
    logits = {name: decoded_logits(model, ids) for name, model in models.items()}
    error = (logits["qwen"] - logits["torch"]).norm(dim=-1) / logits["torch"].norm(dim=-1)
    assert (error < 3e-2).all(), error


@torch.no_grad()
def decoded_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of ``ids`` [1, n], one token per forward through the cache, as decoding runs:
    each Linear sees one token per sequence, so the quantized layers take their decode kernels. Also used by
    test_int4.py and test_gptq.py."""
    cache, rows = None, []
    for i in range(ids.shape[1]):
        out = model(ids[:, i : i + 1], cache=cache, use_cache=True)
        cache = out.cache
        rows.append(out.logits[0, -1])
    return torch.stack(rows)


def run_python(code: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (a kernel is loaded once per process) with a clean build folder (unless
    ``env`` names one) and no kernel choice (QWEN_*_KERNEL) from the environment; also used by test_int4.py."""
    full_env = {k: v for k, v in os.environ.items() if not (k.startswith("QWEN_") and k.endswith("_KERNEL"))}
    full_env.update({"TORCH_EXTENSIONS_DIR": str(tmp_path / "build"), **env})
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


FALLBACK = """
import torch
from qwen.quantize import Int8Linear, qwen_int8_kernel
print("kernel", qwen_int8_kernel())
layer = Int8Linear(torch.nn.Linear(70, 9))
x = torch.randn(2, 70)
expected = x @ layer.dequantize().T + layer.bias
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
