"""The model flags the server, terminal and web chat share (``qwen.loading``), through the real
argument parser and loader on a tiny checkpoint."""

from __future__ import annotations

import json

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


def test_auto_dtype_is_bf16_where_the_cpu_multiplies_it_and_for_quantized_loads(tiny_chat, tmp_path, monkeypatch):
    """--dtype auto: a folder's flag wins; on a CPU, fp32 weights stay fp32, bf16 weights (as released) load as
    bf16 where AVX-512 BF16 or AMX multiply them (fp32 where bf16 is emulated), and --int8/--int4 load bf16, so
    they never build an fp32 model on the way."""
    from qwen.config import QWenConfig
    from qwen.loading import auto_dtype, stored_dtype
    from qwen.tiny import make_tiny_checkpoint

    released = make_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((released / "config.json").read_text())
    (released / "config.json").write_text(json.dumps({**config, "bf16": False}))  # no flag, as released
    assert stored_dtype(released) == torch.bfloat16 and stored_dtype(tiny_chat) == torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert load(released)[0].transformer.wte.weight.dtype == (torch.bfloat16 if native else torch.float32)
    assert load(tiny_chat)[0].transformer.wte.weight.dtype == torch.float32
    for flags in (["--int8"], ["--int4"]):
        model = load(tiny_chat, *flags)[0]
        assert model.transformer.wte.weight.dtype == model.transformer.ln_f.weight.dtype == torch.bfloat16
    plain = QWenConfig()
    assert auto_dtype(QWenConfig(fp32=True), torch.bfloat16, on_cpu=True, quantized=True) is None  # the flag
    assert auto_dtype(plain, torch.bfloat16, on_cpu=False, quantized=False) is None  # a GPU: the original's choice
    for has_bf16 in (True, False):  # the CPU's answer (torch's probe), both ways
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda has=has_bf16: has)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        want = torch.bfloat16 if has_bf16 else torch.float32
        assert auto_dtype(plain, torch.bfloat16, on_cpu=True, quantized=False) == want
        assert auto_dtype(plain, None, on_cpu=True, quantized=False) == want  # legacy .bin: as released
        assert auto_dtype(plain, torch.float32, on_cpu=True, quantized=False) == torch.float32
        assert auto_dtype(plain, torch.float32, on_cpu=True, quantized=True) == torch.bfloat16


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


@pytest.mark.parametrize("flag", ["--int8", "--int4"])
def test_quantized_with_fp32_activations_quantizes_the_stored_weights(tmp_path, flag, monkeypatch):
    """--int8/--int4 --dtype float32 on a bf16 folder: the quantized layers are those a bf16 load makes (from the
    stored weights, never through an fp32 model: the loader is asked for bf16), everything else computes in fp32,
    and the model decodes."""
    import transformers

    from qwen.quantization import BlockLinear, Int4Linear
    from qwen.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    asked = []
    load_for_real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: asked.append(k["dtype"]) or load_for_real(*a, **k))
    fp32 = load(folder, flag, "--dtype", "float32")[0]
    bf16 = load(folder, flag, "--dtype", "bfloat16")[0]
    assert asked == [torch.bfloat16, torch.bfloat16]
    assert fp32.transformer.wte.weight.dtype == fp32.transformer.ln_f.weight.dtype == torch.float32
    quantized = [(a, b) for a, b in zip(fp32.modules(), bf16.modules(), strict=True)
                 if isinstance(a, (BlockLinear, Int4Linear))]
    assert len(quantized) == 5 * fp32.config.num_hidden_layers + 1
    for a, b in quantized:
        assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers(), strict=True))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits = fp32(ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    out = fp32.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_thread_count_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--threads", value])
    assert info.value.code == 2
    assert f"--threads: expected a whole number of at least 1, not '{value}'" in capsys.readouterr().err


def test_bad_window_spec_names_the_expected_form(tiny_chat):
    with pytest.raises(ValueError, match=r"--window-attn takes MIN:MAX token counts, e\.g\. 1024:8192, not '16'"):
        load(tiny_chat, "--window-attn", "16")
