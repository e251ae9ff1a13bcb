"""Window attention: off by default, exact when windows cover everything, local when they do not,
equal to transformers' Qwen2 sliding window, and bounded KV memory in the engine."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen.config import QWenConfig, window_schedule
from qwen.convert import to_qwen2
from qwen.engine import Engine
from qwen.sampling import SamplingParams
from qwen.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # A larger init range makes attention sharp enough for positions to matter.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("window"), layers=3, initializer_range=0.2)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("window1"), layers=1, initializer_range=0.2)


def load(path, **overrides):
    return AutoModelForCausalLM.from_pretrained(path, **overrides).eval()


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 150000, (1, n), generator=torch.Generator().manual_seed(seed))


def test_off_by_default_and_schedule():
    config = QWenConfig(num_hidden_layers=4)
    assert config.use_window_attn is False and config.layer_windows() == [None] * 4
    assert window_schedule(4, 1024, 4096) == [1024, 2048, 3072, 4096]
    assert window_schedule(1, 8, 64) == [64]
    with pytest.raises(ValueError, match="min_size"):
        window_schedule(4, 0, 8)
    with pytest.raises(ValueError, match="one entry per layer"):
        QWenConfig(num_hidden_layers=4, use_window_attn=True, window_size=[8, 8])
    assert QWenConfig(num_hidden_layers=3, use_window_attn=True, window_size=[0, 8, None]).layer_windows() == [
        None, 8, None
    ]


def test_windows_covering_the_sequence_change_nothing(folder):
    x = ids(40)
    full = load(folder)(x).logits
    assert torch.equal(load(folder, use_window_attn=True, window_size=40)(x).logits, full)
    assert torch.equal(load(folder, use_window_attn=True, window_size=[64, 40, 1000])(x).logits, full)
    assert not torch.allclose(load(folder, use_window_attn=True, window_size=8)(x).logits, full, atol=1e-4)


def test_one_layer_sees_only_its_window(one_layer):
    w, n = 6, 30
    model = load(one_layer, use_window_attn=True, window_size=w)
    x = ids(n)
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % 150000
    a, b = model(x).logits[0], model(changed).logits[0]
    # Position p sees keys (p - w, p]: token 10 is visible from positions 10..15 only.
    assert torch.equal(a[: 10], b[: 10])
    assert not torch.allclose(a[10 : 10 + w], b[10 : 10 + w], atol=1e-5)
    assert torch.allclose(a[10 + w :], b[10 + w :], atol=1e-6, rtol=0)


def test_receptive_field_grows_at_most_w_per_layer(folder):
    w, n, layers = 5, 40, 3
    model = load(folder, use_window_attn=True, window_size=w)
    x = ids(n, seed=1)
    changed = x.clone()
    changed[0, 3] = (x[0, 3] + 7) % 150000
    diff = (model(x).logits[0] - model(changed).logits[0]).abs().amax(-1)
    reach = 3 + layers * (w - 1)  # each layer moves information at most w - 1 positions
    assert diff[reach + 1 :].max() < 1e-5
    assert diff[3] > 1e-3


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_matches_transformers_qwen2_sliding_window(folder, impl):
    model = load(folder, use_window_attn=True, window_size=[None, 7, 7], attn_implementation=impl)
    qwen2 = to_qwen2(model, attn_implementation=impl)
    assert qwen2.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    x = torch.cat([ids(30, seed=2), ids(30, seed=3)])
    assert (model(x).logits - qwen2(x).logits).abs().max() < 1e-4
    kwargs = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.0, eos_token_id=None, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    ours, theirs = model.generate(x, **kwargs), qwen2.generate(x, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert max((a - b).abs().max() for a, b in zip(ours.logits, theirs.logits, strict=True)) < 1e-4


def test_engine_matches_generate_and_keeps_windowed_memory_flat(folder, tokenizer):
    model = load(folder, use_window_attn=True, window_size=[None, 8, 5])
    engine = Engine(model, tokenizer, max_batch_size=3, max_model_len=512)
    prompts = [ids(n, seed=n)[0].tolist() for n in (20, 3, 12)]
    sizes_before = [layer["k"].shape[2] for layer in engine.cache.layers]
    seqs = engine.generate(prompts, SamplingParams(max_new_tokens=40, do_sample=False))
    for prompt, seq in zip(prompts, seqs, strict=True):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, repetition_penalty=1.0,
                             eos_token_id=None)[0, len(prompt):].tolist()
        assert seq.output_ids == ref
    sizes_after = [layer["k"].shape[2] for layer in engine.cache.layers]
    assert sizes_before[1:] == sizes_after[1:] == [8, 5]  # the windowed layers never grew
    # The full-attention layer grows with the sequence (past the initial 256 here).
    engine.generate([ids(300, seed=9)[0].tolist()], SamplingParams(max_new_tokens=2, do_sample=False))
    assert [layer["k"].shape[2] for layer in engine.cache.layers] == [512, 8, 5]
