"""Parity with an independent implementation: transformers' own Qwen2ForCausalLM.

Qwen v1 and Qwen2 share the block math (pre-norm RMSNorm, q/k/v with bias, rotate-half rotary,
SwiGLU MLP, untied lm_head). Below seq_length the Qwen v1 extras (dynamic NTK, logn) are inactive,
so mapping our weights onto Qwen2ForCausalLM must give the same logits and the same greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from qwen.convert import to_qwen2
from qwen.tiny import make_tiny_checkpoint

TOL = 1e-4
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Hi",
    "1 2 3 4 5 6 7 8 9 10 11 12 13",
]


@pytest.fixture(scope="module")
def parity_folder(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("parity"), layers=3, hidden=64, heads=4, intermediate=256)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def ours(request, parity_folder):
    model = AutoModelForCausalLM.from_pretrained(parity_folder, dtype=torch.float32, attn_implementation=request.param)
    assert model.config._attn_implementation == request.param
    return model.eval()


def qwen2_from(model) -> Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM with our weights mapped onto it (strict: every key covered)."""
    return to_qwen2(model, attn_implementation="eager")


@pytest.fixture(scope="module")
def reference(parity_folder):
    model = AutoModelForCausalLM.from_pretrained(parity_folder, dtype=torch.float32).eval()
    return qwen2_from(model)


@pytest.fixture(scope="module")
def left_tok(parity_folder):
    return AutoTokenizer.from_pretrained(parity_folder, pad_token="<|extra_0|>", padding_side="left")


def test_mapping_covers_every_weight(ours, reference):
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in reference.parameters())
    assert n_ours == n_ref


@torch.no_grad()
def test_single_prompt_logits_match_qwen2(ours, reference, left_tok):
    for prompt in PROMPTS:
        ids = left_tok(prompt, return_tensors="pt").input_ids
        a = ours(ids).logits
        b = reference(ids).logits
        assert a.dtype == torch.float32
        assert (a - b).abs().max().item() < TOL, prompt


@torch.no_grad()
def test_random_ids_logits_match_qwen2(ours, reference):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151851, (2, 40), generator=gen)
    assert (ours(ids).logits - reference(ids).logits).abs().max().item() < TOL


@torch.no_grad()
def test_left_padded_batch_logits_match_qwen2(ours, reference, left_tok):
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    mask = enc.attention_mask
    assert (mask[:, 0] == 0).any(), "the batch must actually be left-padded"
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    a = ours(enc.input_ids, attention_mask=mask).logits
    b = reference(enc.input_ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert torch.isfinite(a).all()
    assert (a[real] - b[real]).abs().max().item() < TOL
    # ...and each row equals that prompt run alone (no padding).
    for row, prompt in enumerate(PROMPTS):
        ids = left_tok(prompt, return_tensors="pt").input_ids
        alone = ours(ids).logits[0]
        assert (a[row][real[row]] - alone).abs().max().item() < TOL


@torch.no_grad()
def test_greedy_generation_matches_qwen2(ours, reference, left_tok):
    kw = dict(do_sample=False, max_new_tokens=20, repetition_penalty=1.0, pad_token_id=left_tok.pad_token_id)
    for prompt in PROMPTS[:1]:
        ids = left_tok(prompt, return_tensors="pt").input_ids
        a = ours.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        b = reference.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        assert a.shape[1] == ids.shape[1] + 20
        assert torch.equal(a, b), prompt


@torch.no_grad()
def test_batched_left_padded_greedy_generation_matches_qwen2(ours, reference, left_tok):
    enc = left_tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(do_sample=False, max_new_tokens=20, repetition_penalty=1.0, pad_token_id=left_tok.pad_token_id)
    a = ours.generate(**enc, **kw)
    b = reference.generate(**enc, **kw)
    assert torch.equal(a, b)
    assert a.shape[1] == enc.input_ids.shape[1] + 20
