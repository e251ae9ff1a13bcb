"""Window attention: off by default, exact when windows cover everything, local when they do not,
equal to transformers' Qwen2 sliding window, and bounded KV memory in the engine."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen.config import QWenConfig, window_schedule
from qwen.convert import to_qwen2
from qwen.engine import Engine
from qwen.modeling import Window, flash_attention, flex_window_attention
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


@torch.no_grad()  # FlexAttention has no backward on the CPU
def test_flex_attention_window_equals_the_dense_mask(folder):
    """FlexAttention (the CUDA path for windowed prefills) with the window as a block mask computes what
    the dense masked SDPA does, for one window per layer and mixed layers, with left padding too, and
    equals Qwen2's sliding window; the generated tokens are the same."""
    windows = dict(use_window_attn=True, window_size=[None, 7, 5])
    dense, flex = load(folder, **windows), load(folder, **windows, attn_implementation="flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    x = torch.cat([ids(150, seed=4), ids(150, seed=5)])  # past one 128-token block
    ref = dense(x).logits
    assert (flex(x).logits - ref).abs().max() < 1e-4
    same = dict(use_window_attn=True, window_size=[None, 7, 7])  # Qwen2 has one window size
    assert (load(folder, **same, attn_implementation="flex_attention")(x).logits
            - to_qwen2(load(folder, **same))(x).logits).abs().max() < 1e-4
    padded = torch.ones_like(x)
    padded[1, :37] = 0  # row 1 is left-padded
    ours, theirs = flex(x, attention_mask=padded).logits, dense(x, attention_mask=padded).logits
    assert (ours[0] - theirs[0]).abs().max() < 1e-4 and (ours[1, 37:] - theirs[1, 37:]).abs().max() < 1e-4
    kwargs = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.0, eos_token_id=None, pad_token_id=0)
    assert torch.equal(flex.generate(x[:, :40], **kwargs), dense.generate(x[:, :40], **kwargs))


def test_flash_attn_gets_the_window_as_window_size():
    """flash-attn (CUDA only) takes [B, T, heads, D] and a window of w keys as window_size=(w - 1, 0);
    checked here with a stand-in that records the call and computes the same windowed attention."""
    calls = []

    def flash(q, k, v, dropout_p, causal, window_size=(-1, -1)):
        calls.append((q.shape, causal, window_size, dropout_p))
        left = window_size[0]
        t = q.shape[1]
        allowed = torch.ones(t, t, dtype=torch.bool).tril() & ~torch.ones(t, t, dtype=torch.bool).tril(-left - 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
        return out.transpose(1, 2)

    q, k, v = (torch.randn(2, 4, 20, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    got = flash_attention(flash, q, k, v, 0.0, True, 5)
    assert calls == [(torch.Size([2, 20, 4, 16]), True, (4, 0), 0.0)]
    pos = torch.arange(20)
    window = Window(5, pos[None].expand(2, -1), pos[None].expand(2, -1), None)
    assert (got - flex_window_attention(q, k, v, window)).abs().max() < 1e-5
