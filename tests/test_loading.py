"""The model flags the server, terminal and web chat share (``qwen.loading``), through the real
argument parser and loader on a tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from qwen.config import window_schedule
from qwen.loading import load_model
from qwen.quantize import Int8Linear
from qwen.serve.main import parse_args


def load(folder, *flags: str):
    return load_model(folder, parse_args(["-c", str(folder), *flags]))


def test_defaults_load_the_checkpoint_as_it_is(tiny_chat):
    model, tokenizer = load(tiny_chat)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert model.config.use_window_attn is False and model.config.use_cache_quantization is False
    assert not model.training and tokenizer.encode("hello")


def test_model_flags_reach_the_model(tiny_chat):
    threads = torch.get_num_threads()
    try:
        model, _ = load(tiny_chat, "--int8", "--kv-cache-int8", "--window-attn", "4:16", "--dtype", "bfloat16",
                        "--threads", "1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    layers = model.config.num_hidden_layers
    assert model.config.use_cache_quantization is True
    assert model.config.use_window_attn is True and model.config.window_size == window_schedule(layers, 4, 16)
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.scales.dtype == torch.bfloat16
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_thread_count_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--threads", value])
    assert info.value.code == 2
    assert f"--threads: expected a whole number of at least 1, not '{value}'" in capsys.readouterr().err


def test_bad_window_spec_names_the_expected_form(tiny_chat):
    with pytest.raises(ValueError, match=r"--window-attn takes MIN:MAX token counts, e\.g\. 1024:8192, not '16'"):
        load(tiny_chat, "--window-attn", "16")
