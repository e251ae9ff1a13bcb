"""The CUDA paths, checked whenever a GPU is present (skipped elsewhere): the model in fp32/bf16/fp16,
the engine (overlapped steps) and its compiled decode step (CUDA graphs), fused weights, window
attention (FlexAttention) and the int8 KV cache under CUDA's SDPA kernels, the int8 (Triton) and int4
(tinygemm) weight kernels, and flash-attn when it is installed.

    pytest tests/test_cuda.py      # on a machine with a GPU
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from qwen.engine import Engine
from qwen.modeling import _flash_attn_func, attend
from qwen.quantization import triton_int8
from qwen.quantize import Int4Linear, Int8Linear, dequantize_blocks, quantize_blocks, quantize_int4_, quantize_int8_
from qwen.sampling import SamplingParams
from qwen.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog", "a b c d e f g h i j k l m n o p", "你好，世界"]
MAX_NEW = [12, 5, 9, 16]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny checkpoint with large weights: peaky attention and clear argmax margins."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sharp-cuda"), initializer_range=0.3, seed=1)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]


def load(folder, dtype: torch.dtype, device: str = "cuda", **config):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device, **config).eval()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()


def engine_tokens(model, tokenizer, prompts, compile: bool = False, batch: int = 4,
                  overlap: bool = False) -> list[list[int]]:
    engine = Engine(model, tokenizer, max_batch_size=batch, compile=compile, overlap=overlap)
    params = [SamplingParams(max_new_tokens=n, do_sample=False) for n in MAX_NEW]
    return [s.output_ids for s in engine.generate(prompts, params)]


def generate_tokens(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, repetition_penalty=1.0, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_default_dtype_on_cuda_is_the_originals(tiny_chat):
    """No dtype and no bf16/fp16 flag: bf16 where the GPU has it, as the original's automatic choice."""
    model = AutoModelForCausalLM.from_pretrained(tiny_chat, device_map="cuda")
    assert model.device.type == "cuda"
    assert model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def test_fp32_on_cuda_matches_cpu(sharp, prompts):
    ids = prompts[1] + prompts[3] + prompts[2]
    cpu, gpu = logits(load(sharp, torch.float32, "cpu"), ids), logits(load(sharp, torch.float32), ids)
    assert (cpu - gpu).abs().max() < 1e-3 * cpu.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda_is_close_to_fp32(sharp, prompts, dtype):
    ids = prompts[1] + prompts[3] + prompts[2]
    ref, got = logits(load(sharp, torch.float32, "cpu"), ids), logits(load(sharp, dtype), ids)
    assert torch.isfinite(got).all()
    assert F.cosine_similarity(ref, got, dim=-1).min() > 0.99
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("kv_cache_int8", [False, True])
def test_engine_on_cuda_matches_generate(sharp, tokenizer, prompts, kv_cache_int8):
    """Batched, except with the int8 cache: a batch's matmuls round differently from a single row's,
    and int8 storage can turn such a last-bit difference into a whole quantization step."""
    model = load(sharp, torch.float32, use_cache_quantization=kv_cache_int8)
    expected = [generate_tokens(model, p, n) for p, n in zip(prompts, MAX_NEW, strict=True)]
    assert engine_tokens(model, tokenizer, prompts, batch=1 if kv_cache_int8 else 4) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_step_with_cuda_graphs(sharp, tokenizer, prompts, dtype):
    """The compiled step (reduce-overhead: CUDA graphs) replays the eager engine's tokens in fp32; in
    bf16, where fused kernels round differently, it agrees on every second token (the first decode
    step) and on most of the rest."""
    model = load(sharp, dtype)
    eager = engine_tokens(model, tokenizer, prompts)
    compiled = engine_tokens(model, tokenizer, prompts, compile=True)
    again = engine_tokens(model, tokenizer, prompts, compile=True)  # replays the recorded graphs
    assert compiled == again
    if dtype == torch.float32:
        assert compiled == eager
    else:
        assert [c[:2] for c in compiled] == [e[:2] for e in eager]
        same = sum(a == b for c, e in zip(compiled, eager, strict=True) for a, b in zip(c, e, strict=True))
        assert same >= 0.8 * sum(MAX_NEW)


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_window_attention_on_cuda_matches_cpu(sharp, tokenizer, prompts, implementation):
    windows = dict(use_window_attn=True, window_size=[None, 8], attn_implementation=implementation)
    cpu, gpu = load(sharp, torch.float32, "cpu", **windows), load(sharp, torch.float32, **windows)
    ids = prompts[2] + prompts[1] + prompts[2]
    ref, got = logits(cpu, ids), logits(gpu, ids)
    assert (ref - got).abs().max() < 1e-3 * ref.abs().max()
    assert engine_tokens(gpu, tokenizer, prompts) == engine_tokens(cpu, tokenizer, prompts)


@pytest.mark.skipif(_flash_attn_func() is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_matches_eager_attention(dtype):
    """attend() hands unmasked half-precision CUDA attention to flash-attn: a causal prefill and a
    decode over a longer cache (flash-attn aligns the causal diagonal bottom-right)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for q_len, kv_len in [(37, 37), (1, 50), (5, 50)]:
        q, k, v = (torch.randn(2, 4, n, 64, generator=g, device="cuda", dtype=dtype) for n in (q_len, kv_len, kv_len))
        ref = attend(q.float(), k.float(), v.float(), None, implementation="eager")
        got = attend(q, k, v, None, implementation="flash_attention_2")
        assert (ref - got.float()).abs().max() < 2e-2


def test_triton_int8_kernel_is_opt_in(monkeypatch):
    """Until bench/gpu_check.sh has passed on a GPU, int8 layers on CUDA dequantize unless QWEN_TRITON_INT8=1."""
    for value, expected in ((None, False), ("0", False), ("1", True)):
        if value is None:
            monkeypatch.delenv("QWEN_TRITON_INT8", raising=False)
        else:
            monkeypatch.setenv("QWEN_TRITON_INT8", value)
        triton_int8.available.cache_clear()
        assert triton_int8.available() is expected
    triton_int8.available.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_int8_kernel_equals_the_dequantized_matmul(dtype):
    """qwen's Triton int8 kernel (decoding with --int8 on CUDA) over odd shapes and 1..16 rows."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, n, k in [(1, 2048, 5504), (3, 100, 300), (16, 6144, 2048), (8, 151936, 64), (2, 17, 1000)]:
        q, scales = quantize_blocks(torch.randn(n, k, generator=g, device="cuda"), block_size=k)  # one per row
        scales = scales[:, 0]
        x = torch.randn(rows, k, generator=g, device="cuda").to(dtype)
        ref = x.double() @ (q.double() * scales.double()[:, None]).t()
        got = torch.ops.qwen.int8_matmul_cuda(x, q, scales.to(dtype))
        assert not triton_int8._broken  # the kernel ran, not the fallback
        assert got.dtype == dtype
        assert (got.double() - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2) * ref.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_on_cuda_decode_as_their_dequantized_model(sharp, tokenizer, prompts, bits):
    """--int8 (Triton kernel) and --int4 (tinygemm) layers on CUDA equal their dequantized weights'
    matmul, the model's logits stay close to fp32, and the engine decodes as model.generate does."""
    model = load(sharp, torch.bfloat16).fuse_weights_()
    quantize_int8_(model) if bits == 8 else quantize_int4_(model, group_size=32)
    kind = Int8Linear if bits == 8 else Int4Linear
    assert isinstance(model.transformer.h[0].mlp.w12, kind)
    dense = load(sharp, torch.float32)
    with torch.no_grad():
        for layer_name in ("attn.c_attn", "attn.c_proj", "mlp.c_proj"):
            layer = model.transformer.h[0].get_submodule(layer_name)
            x = torch.randn(3, layer.in_features, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), dequantized(layer))
            assert (layer(x).float() - ref).abs().max() < 2e-2 * ref.abs().max()
    ids = prompts[1] + prompts[3]
    assert F.cosine_similarity(logits(model, ids), logits(dense, ids), dim=-1).min() > (0.99 if bits == 8 else 0.9)
    expected = [generate_tokens(model, p, n) for p, n in zip(prompts, MAX_NEW, strict=True)]
    assert engine_tokens(model, tokenizer, prompts, batch=1) == expected


def dequantized(layer) -> torch.Tensor:
    """The fp32 weight a quantized layer stands for (int4: through its own kernel on the identity)."""
    if isinstance(layer, Int8Linear):
        return dequantize_blocks(layer.weight, layer.scales, torch.float32)
    eye = torch.eye(layer.in_features, device="cuda", dtype=torch.bfloat16)
    bias = layer.bias.float() if layer.bias is not None else 0
    return (layer(eye).float() - bias).t()


def test_fused_weights_compiled_engine_on_cuda(sharp, tokenizer, prompts):
    """The server's GPU setup (fused w1/w2, compiled step, overlapped steps) in fp32 replays the eager
    unfused engine's tokens."""
    model = load(sharp, torch.float32)
    expected = engine_tokens(model, tokenizer, prompts)
    assert engine_tokens(model.fuse_weights_(), tokenizer, prompts, compile=True, overlap=True) == expected
