"""int4 weight-only layers (``quantize_int4_``, ``--int4``): 4-bit blocks of 32 with a bf16 scale each (Q4_0's
rule, ``BlockLinear``: the default where qwen's AVX-512 block kernel runs, whose arithmetic test_int8_kernel.py
checks) and asymmetric groups (``Int4Linear``: GPTQ's layout). Group-wise round-to-nearest
checked against its float64 formula; qwen's CPU kernel (int8 activations, integer dot products, AVX-512
VNNI and AVX2) against a float64 model of what it computes, and its dequantized prefill path; PyTorch's
CPU int4 kernel against the dequantized weight; whole models through the engine and the front ends'
loader. The CUDA kernel is checked in test_cuda.py.

qwen's kernel is compiled on first use (about 15 s, then cached); its tests need an AVX2 CPU and a
compiler and are skipped, visibly, elsewhere."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from test_int8_kernel import decoded_logits, run_python  # tests/ is on sys.path
from torch import nn
from transformers import AutoModelForCausalLM

from qwen.cpu_kernels import qwen_int4_kernel, qwen_int8_kernel
from qwen.engine import Engine
from qwen.loading import add_model_args, load_model
from qwen.quantization import layers
from qwen.quantization.layers import BlockLinear, integer_prompts, unpack_blocks
from qwen.quantize import (
    Int4Linear,
    dequantize_blocks,
    dequantize_groups,
    quantize_blocks,
    quantize_groups,
    quantize_int4_,
)
from qwen.sampling import SamplingParams
from qwen.tiny import make_tiny_checkpoint

HAS_KERNEL = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="qwen's int4 kernel needs an AVX2 CPU")
needs_block_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                        reason="qwen's block kernel (--int4's blocks of 32) needs an AVX-512 CPU")


@pytest.fixture(scope="module")
def kernel():
    if not HAS_KERNEL:
        pytest.skip("qwen's int4 kernel needs an AVX2 CPU")
    op = qwen_int4_kernel()
    assert op is not None, "qwen's int4 kernel did not build on an AVX2 machine (see the warning)"
    return op


def kernel_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What qwen's kernel computes, in float64: each row of x quantized to int8 per 128 channels
    (round half to even of x * 127 / max|x|, the product taken in float32 as the kernel does), then
    sum over blocks of a * s * (xq . q) - a * s * z * sum(xq)."""
    rows, width = x.shape
    blocks = x.float().reshape(rows, width // 128, 128)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv).double()  # torch.round rounds half to even
    a = (amax / 127).double()  # [rows, blocks, 1]
    group_of_block = torch.arange(width // 128) * 128 // (width // scale.shape[1])
    s, z = scale.double()[:, group_of_block], zero.double()[:, group_of_block]  # [out, blocks]
    qb = q.double().reshape(q.shape[0], width // 128, 128)  # [out, blocks, 128]
    dots = torch.einsum("rbk,obk->rob", xq, qb)  # [rows, out, blocks]
    sums = xq.sum(-1)  # [rows, blocks]
    return (a.squeeze(-1)[:, None] * s[None] * (dots - z[None] * sums[:, None])).sum(-1)


def test_quantize_groups_follows_the_formula():
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, scale, zero = quantize_groups(w, 4, 32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (24, 3)
    groups = w.reshape(24, 3, 32)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    torch.testing.assert_close(scale.double(), (hi - lo) / 15, rtol=1e-6, atol=0)
    # Round to nearest: every weight within half a step of its dequantized value.
    err = (dequantize_groups(q, scale, zero).double() - w).reshape(24, 3, 32).abs()
    assert (err <= scale.double()[..., None] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="groups of 64"):
        quantize_groups(torch.zeros(8, 96), 4, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_f", "in_f", "group"), [(16, 32, 32), (48, 256, 64), (96, 384, 128), (16, 512, 256)])
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_torch_kernel_layer_equals_its_dequantized_weight(dtype, out_f, in_f, group, rows):
    torch.manual_seed(out_f + in_f + rows)
    linear = nn.Linear(in_f, out_f).to(dtype)
    layer = Int4Linear.from_linear(linear, group, kernel="torch")
    assert not layer.use_qwen_kernel
    x = torch.randn(rows, 2, in_f).to(dtype)
    ref = x.double() @ dequantize_groups(*quantize_groups(linear.weight, 4, group)).double().t() + linear.bias.double()
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 2, out_f)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()
    assert layer.packed.numel() * layer.packed.element_size() == out_f * in_f // 2


@pytest.mark.parametrize("avx2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_qwen_kernel_matches_its_float64_model(kernel, avx2, dtype):
    """Every row-tile size (1-8 and past 8), groups of 128 and 256, odd output counts, activations
    with an outlier channel and an all-zero row; AVX2 run on this CPU too. Exact integer sums leave
    only float32 rounding, so the tolerance is tight: a wrong zero-point term, block scale or nibble
    order is off by percents."""
    g = torch.Generator().manual_seed(0)
    for rows in (1, 2, 3, 7, 8, 9, 17):
        for width, group in ((128, 128), (384, 128), (512, 256), (1024, 256)):
            for outputs in (1, 3, 130):
                w = torch.randn(outputs, width, generator=g)
                q, scale, zero = quantize_groups(w, 4, group)
                layer = Int4Linear(q, scale, zero, None, torch.float32, kernel="qwen")
                x = torch.randn(rows, width, generator=g)
                x[:, 5] *= 50  # an outlier channel: only its own block's scale grows
                x[-1] = 0 if rows > 1 else x[-1]
                x = x.to(dtype)
                got = kernel(x, layer.packed, layer.scale_and_offset, group, avx2)
                expected = kernel_reference(x, q, scale, zero)
                assert got.dtype == dtype and got.shape == (rows, outputs)
                tolerance = 1e-5 if dtype == torch.float32 else 1e-2
                error = (got.double() - expected).abs().max() / expected.abs().max()
                assert error < tolerance, (rows, width, outputs, error.item())
                if rows > 1:
                    assert (got[-1] == 0).all()


def test_int4_product_matches_the_float64_model_and_keeps_rows_apart(kernel):
    """The matrix product a prompt takes (``int4_product``, AVX-512 VNNI): the decode kernel's arithmetic (the same
    float64 model, as tightly), over row tiles of 4 and their remainders, groups of 128 and 256, and panels of 32
    outputs (1, 3 and 130: short last panels); each row's output the same to the bit whatever rows come with it."""
    if not layers.VNNI:
        pytest.skip("the int4 product needs a CPU with AVX-512 VNNI")
    g = torch.Generator().manual_seed(8)
    for rows in (1, 3, 5, 33):
        for width, group in ((128, 128), (384, 128), (1024, 256)):
            for outputs in (1, 3, 130):
                q, scale, zero = quantize_groups(torch.randn(outputs, width, generator=g), 4, group)
                layer = Int4Linear(q, scale, zero, None, torch.float32, kernel="qwen")
                x = torch.randn(rows, width, generator=g)
                x[:, 5] *= 50
                got = torch.ops.qwen.int4_product(x, layer.packed, layer.scale_and_offset, group)
                expected = kernel_reference(x, q, scale, zero)
                error = (got.double() - expected).abs().max() / expected.abs().max()
                assert got.shape == (rows, outputs) and error < 1e-5, (rows, width, outputs, error.item())
                for first in {1, rows // 2, rows - 1} - {0}:
                    part = torch.ops.qwen.int4_product(x[:first], layer.packed, layer.scale_and_offset, group)
                    assert torch.equal(part, got[:first])


@pytest.mark.parametrize("avx2", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_qwen_kernel_propagates_non_finite_activations(kernel, avx2, bad):
    """A NaN or inf activation makes its row's outputs non-finite, as the float product would, and
    leaves the other rows alone (the int8 scale of its block would otherwise swallow it)."""
    layer = Int4Linear.from_linear(nn.Linear(256, 32), 128, kernel="qwen")
    x = torch.randn(3, 256)
    x[1, 200] = bad
    got = kernel(x, layer.packed, layer.scale_and_offset, 128, avx2)
    assert not got[1].isfinite().any() and got[[0, 2]].isfinite().all()
    torch.testing.assert_close(got[[0, 2]], kernel(x[[0, 2]], layer.packed, layer.scale_and_offset, 128, avx2))


@pytest.mark.parametrize("avx2", [False, True])
def test_qwen_kernel_a_row_too_small_to_scale_gives_zeros(kernel, avx2):
    """127 / max|x| overflows for subnormal activations: such a block quantizes to zeros, as in the int8 kernel,
    instead of multiplying by an infinite scale."""
    layer = Int4Linear.from_linear(nn.Linear(256, 32), 128, kernel="qwen")
    x = torch.randn(2, 256)
    x[0] = 1e-39  # subnormal in float32
    got = kernel(x, layer.packed, layer.scale_and_offset, 128, avx2)
    assert (got[0] == 0).all() and got[1].abs().max() > 0


def test_the_bf16_dequantized_weight_keeps_nans(kernel):
    """Rounding to bf16 must not carry a NaN's payload into the sign or exponent (it made -0, 0 or inf)."""
    layer = Int4Linear.from_linear(nn.Linear(128, 16), 128, kernel="qwen")
    for bits in (0x7FFFFFFF, -1, 0x7F807FFF):  # NaNs: all ones, negative all ones, a low payload
        scale_and_offset = layer.scale_and_offset.clone()
        scale_and_offset[0, 0, 0] = torch.tensor([bits], dtype=torch.int32).view(torch.float32)
        weight = torch.ops.qwen.int4_dequantize(layer.packed, scale_and_offset, 128, torch.bfloat16)
        assert weight[0].isnan().all() and weight[1:].isfinite().all(), hex(bits)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_prompt_dequantizes_a_weight_a_block_at_a_time(kind, monkeypatch):
    """A prompt's matmul makes the float weight a block of output rows at a time, so it never holds a whole float
    copy (an lm_head's is 1.2 GB in fp32): blocks give the product of the whole weight, and the int4 layers'
    reusable buffer stays one block."""
    import threading

    from qwen.quantization import layers
    from qwen.quantize import Int8Linear

    monkeypatch.setenv("QWEN_INT8_VNNI", "0")  # prompts dequantize (no integer product) on every CPU
    torch.manual_seed(0)
    linear = nn.Linear(256, 1000)
    layer = Int8Linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, 128)
    x = torch.randn(1, 40, 256)
    with torch.no_grad():
        whole = layer(x)  # 1000 x 256 floats: one block
        monkeypatch.setattr(layers, "DEQUANTIZED_BLOCK_BYTES", 96 * 256 * 4)  # blocks of 96 rows, the last of 40
        held = []

        def run() -> None:  # a fresh thread: its own reusable buffer
            held.append(layer(x))
            held.append(getattr(layers._scratch_buffers, "tensor", None))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    torch.testing.assert_close(held[0], whole, rtol=1e-6, atol=1e-6)
    if kind == "int4":
        assert held[1].numel() == 96 * 256


AVX2_ONLY = """
import os
import torch
from qwen.cpu_kernels import qwen_int4_kernel, qwen_int8_kernel
from qwen.quantize import Int4Linear
torch.manual_seed(0)
layer = Int4Linear.from_linear(torch.nn.Linear(640, 48, bias=False), 128)
x = torch.randn(5, 1, 640)
print(torch.backends.cpu.get_cpu_capability(), qwen_int8_kernel() is None, layer.use_qwen_kernel)
torch.save({"x": x, "out": layer(x), "packed": layer.packed, "scale_and_offset": layer.scale_and_offset},
           os.environ["OUT"])
"""


@needs_kernel
def test_an_avx2_only_dispatch_runs_the_avx2_kernel(kernel, tmp_path):
    """ATEN_CPU_CAPABILITY=avx2 makes PyTorch, and qwen's kernels, dispatch as on an AVX2-only CPU: no int8 kernel
    (it needs AVX-512), and the int4 layer's output is the AVX2 kernel's, bit for bit."""
    from qwen.cpu_kernels import build_folder

    result = run_python(AVX2_ONLY, tmp_path, ATEN_CPU_CAPABILITY="avx2", OUT=str(tmp_path / "out.pt"),
                        TORCH_EXTENSIONS_DIR=str(build_folder("int4_matvec").parent))  # the kernel built here
    assert result.stdout.split() == ["AVX2", "True", "True"], result.stderr
    got = torch.load(tmp_path / "out.pt")
    flat = got["x"].reshape(5, 640)
    narrow = kernel(flat, got["packed"], got["scale_and_offset"], 128, True)
    assert torch.equal(got["out"].reshape(5, 48), narrow)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # where both exist, the dispatch did change
        assert not torch.equal(narrow, kernel(flat, got["packed"], got["scale_and_offset"], 128, False))


def test_qwen_kernel_avx2_equals_avx512(kernel):
    g = torch.Generator().manual_seed(3)
    layer = Int4Linear.from_linear(nn.Linear(640, 48), 128, kernel="qwen")
    x = torch.randn(5, 640, generator=g)
    wide, narrow = (kernel(x, layer.packed, layer.scale_and_offset, 128, avx2) for avx2 in (False, True))
    torch.testing.assert_close(wide, narrow, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_layer_decodes_with_the_kernel_and_reads_prompts_dequantized(kernel, dtype):
    """A decode step (one token per sequence) runs the kernel (int8 activations: within a percent of the
    dequantized weight's product), a prompt's tokens the dequantized weight and one matmul (float rounding
    only) or, where ``integer_prompts``, the int4 product (int8 activations too). The dequantized weight is the
    group formula exactly, its bf16 form that rounded."""
    torch.manual_seed(1)
    linear = nn.Linear(384, 96).to(dtype)
    layer = Int4Linear.from_linear(linear, 128)
    assert layer.use_qwen_kernel
    q, scale, zero = quantize_groups(linear.weight, 4, 128)
    weight = dequantize_groups(q, scale, zero)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = torch.ops.qwen.int4_dequantize(layer.packed, layer.scale_and_offset, 128, out_dtype)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got, weight.to(out_dtype), rtol=1e-6 if out_dtype == torch.float32 else 1e-2,
                                   atol=1e-6)
    dequantized_tol = 2e-2 if dtype == torch.bfloat16 or integer_prompts(dtype) else 1e-5
    x = torch.randn(16, 384).to(dtype)
    ref = x.double() @ weight.double().t() + linear.bias.double()
    for shape, tol in (((16, 1, 384), 2e-2), ((16, 384), 2e-2), ((1, 16, 384), dequantized_tol)):
        got = layer(x.reshape(shape)).reshape(16, 96)
        assert got.dtype == dtype
        assert (got.double() - ref).abs().max() <= tol * ref.abs().max(), shape
    assert layer.packed.numel() == 96 * 384 // 2 and layer.scale_and_offset.shape == (96, 3, 2)


def test_qwen_kernel_rejects_bad_input(kernel):
    layer = Int4Linear.from_linear(nn.Linear(256, 16), 128, kernel="qwen")
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernel(torch.zeros(1, 384), layer.packed, layer.scale_and_offset, 128)
    with pytest.raises(RuntimeError, match="group_size must be 128"):
        kernel(torch.zeros(1, 256), layer.packed, layer.scale_and_offset, 64)
    with pytest.raises(RuntimeError, match="kernel='qwen' needs"):
        Int4Linear.from_linear(nn.Linear(256, 16), 64, kernel="qwen")  # groups of 64: PyTorch's kernel only


def test_unsupported_shapes_are_refused():
    with pytest.raises(ValueError, match="32, 64, 128 or 256 input channels per group"):
        Int4Linear.from_linear(nn.Linear(48, 8), 16)
    with pytest.raises(ValueError, match="out_features by 16"):
        Int4Linear.from_linear(nn.Linear(64, 12), 32)


def test_quantize_blocks_4_bits_follows_q4_0s_rule():
    """4 bits in blocks of 32: scale = the block's weight of largest magnitude / -8 (rounded to bf16), q = round(w /
    scale) + 8 in 0..15, so that weight is exactly -8 steps and every other one within half a step, but those
    past +7 steps on the other side (clipped: within one step); a zero block is all zeros; packed, the same q."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 100, generator=g) * torch.rand(64, 1, generator=g)
    w[3] = 0
    q, scale = quantize_blocks(w, bits=4)
    blocks = torch.nn.functional.pad(w, (0, 28)).view(64, 4, 32)
    largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(scale, (largest / -8).bfloat16()) and q.dtype == torch.uint8 and int(q.max()) <= 15
    step = scale.double().abs().repeat_interleave(32, dim=1)[:, :100]
    error = (dequantize_blocks(q, scale, torch.float64) - w.double()).abs()
    clipped = q == 15
    assert (error[~clipped] <= step[~clipped] * 0.5001).all() and (error[clipped] <= step[clipped] * 1.0001).all()
    assert clipped.any() and q[3].eq(8).all() and scale[3].eq(0).all()
    assert torch.equal(unpack_blocks(quantize_blocks(w, bits=4, packed=True)[0], 100, bits=4), q)


def test_whole_model_int4(tiny_model, tokenizer):
    """quantize_int4_ on every block Linear (lm_head kept) decodes close to the float model: its
    next-token distribution stays near, and the engine's greedy tokens equal model.generate's."""
    model = quantize_int4_(copy.deepcopy(tiny_model), group_size=32, lm_head="keep")
    linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(linears) == 5 * tiny_model.config.num_hidden_layers and isinstance(model.lm_head, nn.Linear)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    with torch.no_grad():
        ref, got = (m(torch.tensor([ids])).logits[0].log_softmax(-1) for m in (tiny_model, model))
    assert (ref.exp() * (ref - got)).sum(-1).max() < 0.05  # KL per position
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, repetition_penalty=1.0,
                         eos_token_id=None)[0, len(ids):].tolist()
    seq = Engine(model, tokenizer).generate([ids], SamplingParams(max_new_tokens=8, do_sample=False))[0]
    assert seq.output_ids == out


def test_int4_flag_of_the_front_ends(tiny_chat):
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    model, _ = load_model(tiny_chat, parser.parse_args(["--int4", "--cpu-only"]))
    blocks = qwen_int8_kernel() is not None  # an AVX-512 CPU: 4-bit blocks of 32, else groups of 128
    assert isinstance(model.transformer.h[0].mlp.w1, BlockLinear if blocks else Int4Linear)
    with pytest.raises(SystemExit):
        parser.parse_args(["--int4", "--int8"])


@pytest.fixture(scope="module")
def model_128(tmp_path_factory):
    """A tiny model whose every Linear has a multiple of 128 inputs: all of them run qwen's kernel."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("int4") / "m", hidden=128, heads=4, intermediate=512, seed=4)
    return AutoModelForCausalLM.from_pretrained(path).eval()


@needs_kernel
@pytest.mark.parametrize("group_size", [pytest.param(None, marks=needs_block_kernel), 128])
def test_whole_model_on_qwen_kernel(kernel, model_128, tokenizer, group_size):
    """Every block Linear on one of qwen's kernels: 4-bit blocks of 32 (--int4's default on an AVX-512 CPU) or
    groups of 128. The engine (eager and compiled, one prompt or three) gives model.generate's greedy tokens, a
    batch gives each prompt's tokens alone (rows are quantized one by one), and decoding one token at a time (the
    kernel, 8-bit activations) stays within their reach of the same weights dequantized (the prompt path)."""
    model = quantize_int4_(copy.deepcopy(model_128), group_size=group_size)
    kind = BlockLinear if group_size is None else Int4Linear
    linears = [m for m in model.modules() if isinstance(m, kind) and m is not model.lm_head]
    assert len(linears) == 5 * model.config.num_hidden_layers and all(m.use_qwen_kernel for m in linears)
    prompts = [tokenizer.encode(t) for t in ("The quick brown fox jumps over the lazy dog", "a b c d", "你好，世界")]
    params = SamplingParams(max_new_tokens=8, do_sample=False)
    alone = [Engine(model, tokenizer).generate([p], params)[0].output_ids for p in prompts]
    for p, out in zip(prompts, alone, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, repetition_penalty=1.0,
                             eos_token_id=None)[0, len(p):].tolist()
        assert out == ref
    for compile in (False, True):
        batch = Engine(model, tokenizer, compile=compile).generate(prompts, params)
        assert [seq.output_ids for seq in batch] == alone
    ids = torch.tensor([prompts[0] + alone[0]])
    with torch.no_grad():
        want = model(ids).logits[0]  # every position at once: the dequantized weights
    got = decoded_logits(model, ids)  # one position at a time, as decoding runs: qwen's kernel
    # (No top-1 count: on this random model the top two logits of 2 of these 17 positions lie 0.004 apart, under
    # the int8 activations' reach, so which one leads flips with any change of rounding.)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


@needs_kernel
@pytest.mark.parametrize("quantize", ["int4", pytest.param("int4 blocks", marks=needs_block_kernel), "int8",
                                      "int8 float path"])
def test_a_quantized_reply_does_not_depend_on_its_batch_mates(kernel, model_128, tokenizer, quantize, monkeypatch):
    """Short prompts alone would fit a decode kernel's row bound, in a batch they do not: the layers choose
    their path by the tokens each sequence brings (decode steps: the kernel; a prompt: the dequantized weight, or
    the block kernel's integer product where ``integer_prompts``), so every prompt's greedy reply alone is its
    reply next to the others. The kernel and the dequantized weight do round apart on this model (the integer
    product does not: it gives a decode step's bits), so a choice by the batch's row count would change replies;
    "int8 float path" (QWEN_INT8_VNNI=0) takes the dequantized weight for prompts on every CPU."""
    from qwen.quantize import quantize_int8_

    if quantize == "int8 float path":
        monkeypatch.setenv("QWEN_INT8_VNNI", "0")
    model = copy.deepcopy(model_128)
    if quantize.startswith("int8"):
        quantize_int8_(model, kernel="qwen")
    else:
        quantize_int4_(model, group_size=128 if quantize == "int4" else None)
    texts = ["a b c", "你好", "The quick brown fox", "1 2 3 4 5", "Hello there, how are you today?", "x"]
    prompts = [tokenizer.encode(t) for t in texts]
    # alone, within the old row bounds of the kernels (16 int4, 32 int8 rows); together, one chunk past them
    assert all(len(p) <= 16 for p in prompts) and len(prompts) * max(map(len, prompts)) > 32
    params = SamplingParams(max_new_tokens=48, do_sample=False)  # (the old per-batch choice: 3 of 6 int8 replies)
    engine = Engine(model, tokenizer, max_batch_size=8, prefix_cache_bytes=0)
    alone = [engine.generate([p], params)[0].output_ids for p in prompts]
    together = [seq.output_ids for seq in engine.generate(prompts, params)]
    assert together == alone
    layer = model.transformer.h[0].mlp.c_proj
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():  # the kernel's path ([5, 1, in]: one token each) and the prompt path ([1, 5, in])
        same = torch.equal(layer(x[:, None])[:, 0], layer(x[None])[0])
    assert same == (isinstance(layer, BlockLinear) and layer.use_qwen_kernel and integer_prompts(x.dtype))


def test_int4_lm_head_choice(model_128):
    """--int4 makes the lm_head int8 by default (int8 is close to lossless, and it is the largest single read
    of a decode step); lm_head="int4" (4 bits like the other layers) and "keep" as asked."""
    from qwen.quantize import Int8Linear

    assert isinstance(quantize_int4_(copy.deepcopy(model_128)).lm_head, Int8Linear)
    head = quantize_int4_(copy.deepcopy(model_128), lm_head="int4").lm_head
    assert type(head) is BlockLinear and head.bits == 4 if qwen_int8_kernel() else isinstance(head, Int4Linear)
    assert type(quantize_int4_(copy.deepcopy(model_128), lm_head="keep").lm_head) is nn.Linear


FALLBACK = """
import torch
from qwen.cpu_kernels import qwen_int4_kernel, qwen_int8_kernel
from qwen.quantize import Int4Linear, dequantize_groups, quantize_groups
print("kernel", qwen_int4_kernel())
linear = torch.nn.Linear(256, 32)
layer = Int4Linear.from_linear(linear, 128)
x = torch.randn(2, 256)
expected = x @ dequantize_groups(*quantize_groups(linear.weight, 4, 128)).T + linear.bias
print("qwen kernel used", layer.use_qwen_kernel, "close", torch.allclose(layer(x), expected, atol=1e-4))
"""


@needs_kernel
def test_a_failed_build_warns_and_falls_back_to_torchs_kernel(tmp_path):
    done = run_python(FALLBACK, tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert done.returncode == 0, done.stderr
    assert "kernel None" in done.stdout and "qwen kernel used False close True" in done.stdout
    assert "could not build qwen's int4 CPU kernel" in done.stderr and "no-such-compiler" in done.stderr


def test_env_var_selects_torchs_kernel_and_qwen_kernel_request_fails_clearly(tmp_path):
    code = FALLBACK + """
try:
    Int4Linear.from_linear(torch.nn.Linear(256, 32), 128, kernel="qwen")
except RuntimeError as exc:
    print("error:", exc)
"""
    done = run_python(code, tmp_path, QWEN_INT4_KERNEL="torch")
    assert done.returncode == 0, done.stderr
    assert "kernel None" in done.stdout and "qwen kernel used False close True" in done.stdout
    assert "error: kernel='qwen' needs a CPU layer with groups of 128 or 256" in done.stdout
    assert not (tmp_path / "build").exists()  # nothing was compiled
