"""int4 weight-only layers (``Int4Linear``, ``quantize_int4_``, ``--int4``): group-wise round-to-nearest
checked against its float64 formula, PyTorch's CPU int4 kernel against the dequantized weight, and a
whole model through the engine and the front ends' loader. The CUDA kernel is checked in test_cuda.py."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from qwen.engine import Engine
from qwen.loading import add_model_args, load_model
from qwen.quantize import Int4Linear, dequantize_groups, quantize_groups, quantize_int4_
from qwen.sampling import SamplingParams


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
def test_layer_equals_its_dequantized_weight(dtype, out_f, in_f, group, rows):
    torch.manual_seed(out_f + in_f + rows)
    linear = nn.Linear(in_f, out_f).to(dtype)
    layer = Int4Linear.from_linear(linear, group)
    x = torch.randn(rows, 2, in_f).to(dtype)
    ref = x.double() @ dequantize_groups(*quantize_groups(linear.weight, 4, group)).double().t() + linear.bias.double()
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 2, out_f)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()
    assert layer.packed.numel() * layer.packed.element_size() == out_f * in_f // 2


def test_unsupported_shapes_are_refused():
    with pytest.raises(ValueError, match="32, 64, 128 or 256 input channels per group"):
        Int4Linear.from_linear(nn.Linear(48, 8), 16)
    with pytest.raises(ValueError, match="out_features by 16"):
        Int4Linear.from_linear(nn.Linear(64, 12), 32)


def test_whole_model_int4(tiny_model, tokenizer):
    """quantize_int4_ on every block Linear (lm_head kept) decodes close to the float model: its
    next-token distribution stays near, and the engine's greedy tokens equal model.generate's."""
    model = quantize_int4_(copy.deepcopy(tiny_model), group_size=32)
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
    assert isinstance(model.transformer.h[0].mlp.w1, Int4Linear)
    with pytest.raises(SystemExit):
        parser.parse_args(["--int4", "--int8"])
