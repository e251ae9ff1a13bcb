"""GPTQ: the packed v1 layout, the pure-PyTorch loader (dequant and int8 backends), run_gptq.py, and errors.

Tiny random models (nothing is trained), so perplexities are near the vocabulary size; the checks
that mean something are the relative ones: the quantized model's logits against the fp32 model's,
and GPTQ against round-to-nearest at the same width.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_int8_kernel import decoded_logits  # tests/ is on sys.path
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GPTQConfig

from qwen.cpu_kernels import Bf16Linear
from qwen.gptq import (
    GPTQError,
    dequantize,
    gptq_quantize_weight,
    gptqmodel_available,
    pack,
    rtn_quantize_weight,
    unpack,
)
from qwen.modeling import QWenLMHeadModel, QWenModel
from qwen.quantize import Int4Linear, Int8Linear
from qwen.tiny import make_tiny_checkpoint, original_config, weight_shapes

ROOT = Path(__file__).resolve().parents[1]
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")

CALIBRATION = [
    ("What causes the seasons on Earth?",
     "The seasons come from the tilt of Earth's axis, about 23.4 degrees. As Earth orbits the Sun, each "
     "hemisphere leans toward the Sun for part of the year, getting longer days and more direct light."),
    ("Write a Python function that reverses a string.",
     "def reverse(text: str) -> str:\n    return text[::-1]\n\nSlicing with a step of -1 walks the string "
     "from the end to the start and builds a new string."),
    ("How do I make a cup of green tea?",
     "Heat water to about 80 degrees Celsius, not boiling. Put one teaspoon of leaves in the cup, pour "
     "the water, wait two to three minutes, then remove the leaves so the tea does not turn bitter."),
    ("Translate 'good morning' into French, Spanish and German.",
     "French: bonjour. Spanish: buenos días. German: guten Morgen."),
    ("Explain what a hash table is.",
     "A hash table stores key-value pairs in an array. A hash function maps each key to an index, so "
     "lookups, inserts and deletes take constant time on average; collisions are handled by chaining "
     "or open addressing."),
    ("Give me three tips for a job interview.",
     "1. Research the company and the role. 2. Prepare short stories that show your skills. 3. Ask "
     "thoughtful questions at the end; it shows interest."),
    ("什么是机器学习？",
     "机器学习是人工智能的一个分支，它让计算机从数据中学习规律，而不是依靠人工编写的规则。常见的方法包括监督学习、"
     "无监督学习和强化学习。"),
    ("What is 17 times 23?", "17 times 23 is 391: 17 x 20 = 340 and 17 x 3 = 51, and 340 + 51 = 391."),
    ("Summarize the plot of Romeo and Juliet in two sentences.",
     "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings "
     "leads both to take their own lives, which finally reconciles their families."),
    ("Why is the sky blue?",
     "Sunlight is scattered by the molecules of the air, and short wavelengths scatter much more than "
     "long ones (Rayleigh scattering), so blue light reaches our eyes from every direction of the sky."),
    ("List the planets of the solar system.",
     "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune, in order from the Sun."),
    ("How does a bicycle stay upright?",
     "Mostly through steering: when the bike leans, the rider and the geometry of the front fork turn "
     "the wheel into the lean, which brings the wheels back under the center of mass."),
]
HELD_OUT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors can borrow up "
    "to five books at a time for three weeks, and renew them online if nobody else has reserved them. "
    "Quiet rooms on the second floor can be booked for group study, and the café on the ground floor "
    "serves coffee, tea and sandwiches until five. 图书馆周末也开放，但闭馆时间提前到下午四点。"
)


@pytest.fixture(autouse=True)
def default_backend_is_dequant(monkeypatch, request):
    """Where the quant extra is installed the default backend would be gptqmodel; these tests are about
    the plain-PyTorch loader, so the default stays "dequant" (except in the gptqmodel test)."""
    if "gptqmodel_reads" not in request.node.name:
        monkeypatch.setattr("qwen.quantization.gptq_load.gptqmodel_available", lambda: False)


def conversations() -> list[dict]:
    return [
        {"id": f"calib_{i}", "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]}
        for i, (q, a) in enumerate(CALIBRATION)
    ]


# ----- packing and dequantization -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 96), generator=gen)
    values[0] = 2**bits - 1  # top bit of each word set: the int32 words go negative
    rows = pack(values, bits, 0)
    cols = pack(values, bits, 1)
    assert rows.dtype == cols.dtype == torch.int32
    assert rows.shape == (64 * bits // 32, 96) and cols.shape == (64, 96 * bits // 32)
    assert (rows < 0).any()
    assert torch.equal(unpack(rows, bits, 0), values.int())
    assert torch.equal(unpack(cols, bits, 1), values.int())


def test_pack_puts_low_bits_first():
    # 4-bit values 1..8 down the input dim become one word 0x87654321 (value i in bits 4i..4i+3).
    word = pack(torch.arange(1, 9)[:, None], 4, 0)
    assert word.shape == (1, 1) and int(word) == 0x87654321 - 2**32
    assert int(pack(torch.tensor([[1, 2, 3, 4]]), 8, 1)) == 0x04030201


def reference_dequant(qweight, qzeros, scales, g_idx, bits):
    """The v1 formula element by element: W[o, i] = scale[g, o] * (q[i, o] - (zero[g, o] + 1))."""
    per, mask = 32 // bits, 2**bits - 1
    rows, out = qweight.shape
    W = torch.zeros(out, rows * per, dtype=torch.float64)
    for i in range(rows * per):
        g = int(g_idx[i])
        for o in range(out):
            q = (int(qweight[i // per, o]) >> (bits * (i % per))) & mask
            z = (int(qzeros[g, o // per]) >> (bits * (o % per))) & mask
            W[o, i] = float(scales[g, o]) * (q - (z + 1))
    return W


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_hand_built_layer_matches_formula(bits, act_order):
    gen = torch.Generator().manual_seed(7)
    in_f, out_f, group = 64, 16, 16
    words = torch.randint(-(2**31), 2**31 - 1, (in_f * bits // 32, out_f), generator=gen, dtype=torch.int64)
    zwords = torch.randint(-(2**31), 2**31 - 1, (in_f // group, out_f * bits // 32), generator=gen, dtype=torch.int64)
    qweight, qzeros = words.to(torch.int32), zwords.to(torch.int32)
    scales = (torch.rand(in_f // group, out_f, generator=gen) / 10).half()
    g_idx = torch.arange(in_f) // group
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]
    got = dequantize(qweight, qzeros, scales, g_idx.int(), bits)
    want = reference_dequant(qweight, qzeros, scales, g_idx, bits)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(desc_act):
    """GPTQ spreads each rounding error over the columns still to quantize: on inputs with correlated
    channels its output error ||(W - Q) X|| is well below round-to-nearest's on the same grid."""
    gen = torch.Generator().manual_seed(0)
    in_f, out_f, tokens = 256, 64, 2048
    X = torch.randn(tokens, 32, generator=gen) @ torch.randn(32, in_f, generator=gen)
    X += 0.1 * torch.randn(tokens, in_f, generator=gen)
    X *= torch.rand(in_f, generator=gen) * 3  # channels of different scales
    W = 0.02 * torch.randn(out_f, in_f, generator=gen)
    H = 2 * X.t() @ X / tokens

    def output_error(qw):
        from qwen.gptq import dequantize_layer, pack_layer

        Wq = dequantize_layer(pack_layer(qw.q, qw.scales, qw.zeros, qw.g_idx, 4), 4)
        return ((W - Wq) @ X.t()).norm().item()

    gptq = gptq_quantize_weight(W, H, bits=4, group_size=64, desc_act=desc_act)
    rtn = rtn_quantize_weight(W, bits=4, group_size=64)
    assert gptq.q.min() >= 0 and gptq.q.max() <= 15 and gptq.zeros.eq(8).all()
    if desc_act:
        assert not torch.equal(gptq.g_idx, torch.arange(in_f, dtype=torch.int32) // 64)
        assert torch.equal(torch.bincount(gptq.g_idx.long()), torch.full((4,), 64))
    assert output_error(gptq) < 0.6 * output_error(rtn)


# ----- run_gptq.py on a tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gptq-src"), hidden=128, heads=4, intermediate=512, layers=2)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.json"
    path.write_text(json.dumps(conversations(), ensure_ascii=False))
    return path


@pytest.fixture(scope="module")
def quantized(fp32_folder, calib_file, tmp_path_factory) -> dict[int, Path]:
    """run_gptq.py (a subprocess, CPU) at 4 and 8 bits."""
    outs = {}
    for bits in (4, 8):
        out = tmp_path_factory.mktemp(f"gptq-int{bits}")
        cmd = [sys.executable, str(ROOT / "run_gptq.py"), "--model_name_or_path", str(fp32_folder),
               "--data_path", str(calib_file), "--out_path", str(out), "--max_len", "8192",
               "--bits", str(bits), "--group-size", "128", "--device", "cpu"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"wrote {bits}-bit GPTQ" in done.stdout
        assert "GPTQ" in done.stderr  # the tqdm bar
        outs[bits] = out
    return outs


@pytest.fixture(scope="module")
def reference(fp32_folder):
    tokenizer = AutoTokenizer.from_pretrained(fp32_folder)
    model = AutoModelForCausalLM.from_pretrained(fp32_folder)
    ids = torch.tensor([tokenizer.encode(HELD_OUT)])
    return tokenizer, ids, logits_and_ppl(model, ids)


def logits_and_ppl(model, ids):
    with torch.no_grad():
        out = model(ids, labels=ids)
    return out.logits.float(), math.exp(out.loss.item())


@pytest.mark.parametrize("bits", [4, 8])
def test_run_gptq_writes_the_original_layout(quantized, fp32_folder, bits):
    out = quantized[bits]
    for name in ("config.json", "quantize_config.json", "model.safetensors", "generation_config.json",
                 "tokenizer_config.json", "qwen.tiktoken", "modeling_qwen.py"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "damp_percent",
                               "true_sequential", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": bits, "group_size": 128, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq"}
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"  # the source's own config

    shapes = weight_shapes(json.loads((fp32_folder / "config.json").read_text()))
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for i in range(2):
            for name in BLOCK_LINEARS:
                p = f"transformer.h.{i}.{name}"
                out_f, in_f = shapes[p + ".weight"]
                assert p + ".weight" not in keys
                assert f.get_tensor(p + ".qweight").dtype == torch.int32
                assert f.get_tensor(p + ".qweight").shape == (in_f * bits // 32, out_f)
                assert f.get_tensor(p + ".qzeros").shape == (math.ceil(in_f / 128), out_f * bits // 32)
                assert f.get_tensor(p + ".scales").dtype == torch.float16
                assert f.get_tensor(p + ".g_idx").tolist() == [j // 128 for j in range(in_f)]
                # symmetric: every zero point is 2^(bits-1), stored as zero - 1
                zeros = unpack(f.get_tensor(p + ".qzeros"), bits, 1)
                assert zeros.eq(2 ** (bits - 1) - 1).all()
            assert f.get_tensor(f"transformer.h.{i}.attn.c_attn.bias").dtype == torch.float16
            assert f"transformer.h.{i}.attn.c_proj.bias" not in keys
        for name in ("transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight",
                     "transformer.h.0.ln_1.weight"):
            assert f.get_tensor(name).dtype == torch.float16


@pytest.mark.parametrize(("bits", "ppl_tol", "logit_tol"), [(8, 0.05, 0.03), (4, 0.20, 0.25)])
def test_quantized_model_stays_close_to_fp32(quantized, reference, bits, ppl_tol, logit_tol):
    tokenizer, ids, (ref_logits, ref_ppl) = reference
    model = AutoModelForCausalLM.from_pretrained(quantized[bits])
    assert isinstance(model, QWenLMHeadModel) and not model.training
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    logits, ppl = logits_and_ppl(model, ids)
    assert abs(ppl / ref_ppl - 1) < ppl_tol, (ppl, ref_ppl)
    assert (logits - ref_logits).norm() / ref_logits.norm() < logit_tol
    response, history = model.chat(tokenizer, "Hello!", history=None, do_sample=False, max_new_tokens=8)
    assert isinstance(response, str) and history == [("Hello!", response)]


def test_gptq_model_is_closer_to_fp32_than_round_to_nearest(quantized, fp32_folder, reference):
    _, ids, (ref_logits, _) = reference
    gptq_logits, _ = logits_and_ppl(AutoModelForCausalLM.from_pretrained(quantized[4]), ids)
    rtn = AutoModelForCausalLM.from_pretrained(fp32_folder)
    with torch.no_grad():
        for block in rtn.transformer.h:
            for name in BLOCK_LINEARS:
                layer = block.get_submodule(name)
                qw = rtn_quantize_weight(layer.weight, 4, 128)
                layer.weight.copy_(dequantize(pack(qw.q.t(), 4, 0), pack(qw.zeros - 1, 4, 1), qw.scales, qw.g_idx, 4))
    rtn_logits, _ = logits_and_ppl(rtn, ids)
    assert (gptq_logits - ref_logits).norm() < (rtn_logits - ref_logits).norm()


def test_int8_backend(quantized, reference):
    _, ids, (ref_logits, _) = reference
    dequant = AutoModelForCausalLM.from_pretrained(quantized[4], gptq_backend="dequant")
    model = AutoModelForCausalLM.from_pretrained(quantized[4], gptq_backend="int8")
    for block in model.transformer.h:
        for name in BLOCK_LINEARS:
            assert isinstance(block.get_submodule(name), Int8Linear)
    assert model.transformer.h[0].attn.c_attn.bias is not None
    assert isinstance(model.lm_head, torch.nn.Linear)  # stays as stored (fp16 in the folder)
    logits, _ = logits_and_ppl(model, ids)
    dq_logits, _ = logits_and_ppl(dequant, ids)
    assert (logits - dq_logits).norm() / dq_logits.norm() < 0.02
    weight_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(".weight"))
    assert weight_bytes == sum(m.weight.numel() for b in dequant.transformer.h for m in b.modules()
                               if isinstance(m, torch.nn.Linear))


def test_int4_backend_keeps_the_4_bit_values(quantized, reference, tmp_path, monkeypatch):
    """gptq_backend="int4" runs the folder's own 4-bit values through PyTorch's int4 kernel (the CPU one
    here, tinygemm on CUDA): the same weights as dequantizing, in half a byte each. (Prompts dequantize here:
    QWEN_INT8_VNNI=0 keeps them off the int8-activation product, which the next test covers.)"""
    monkeypatch.setenv("QWEN_INT8_VNNI", "0")
    _, ids, _ = reference
    dequant = AutoModelForCausalLM.from_pretrained(quantized[4], gptq_backend="dequant", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(quantized[4], gptq_backend="int4", dtype=torch.float32)
    for block in model.transformer.h:
        for name in BLOCK_LINEARS:
            assert isinstance(block.get_submodule(name), Int4Linear)
    logits, _ = logits_and_ppl(model, ids)
    dq_logits, _ = logits_and_ppl(dequant, ids)
    assert (logits - dq_logits).norm() / dq_logits.norm() < 1e-4
    packed = sum(m.packed.numel() * m.packed.element_size() for m in model.modules() if isinstance(m, Int4Linear))
    assert packed == sum(m.weight.numel() for b in dequant.transformer.h for m in b.modules()
                         if isinstance(m, torch.nn.Linear)) // 2
    write_gptq_folder(tmp_path / "act", 4, desc_act=True, shards=1)
    with pytest.raises(GPTQError, match=r"act-order.*gptq_backend='int8' or 'dequant'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "act", gptq_backend="int4", dtype=torch.float32)


def test_int4_backend_runs_qwens_cpu_kernel_for_groups_of_128(tmp_path):
    """Groups of 128 (Qwen's -Int4 folders) run qwen's own int4 kernel on the CPU: its weights are the
    folder's exactly, and decoding one token at a time (the kernel, with int8 activations) stays within
    a percent or two of the dequantized model; --int4 also makes the lm_head int8."""
    from qwen.loading import add_model_args, load_model

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("qwen's int4 kernel needs an AVX2 CPU")
    expected = write_gptq_folder(tmp_path / "g128", 4, hidden=128, intermediate=512, group=128)["expected"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g128", gptq_backend="int4", dtype=torch.float32)
    dequant = AutoModelForCausalLM.from_pretrained(tmp_path / "g128", gptq_backend="dequant", dtype=torch.float32)
    for module, weight in expected.items():
        layer = model.get_submodule(module)
        assert isinstance(layer, Int4Linear) and layer.use_qwen_kernel, module
        got = torch.ops.qwen.int4_dequantize(layer.packed, layer.scale_and_offset, 128, torch.float32)
        torch.testing.assert_close(got, weight, rtol=0, atol=1e-6)
    ids = torch.tensor([[9707, 11, 1879, 0, 358, 1079, 264, 1614]])
    with torch.no_grad():
        want = dequant(ids).logits[0]
    assert (decoded_logits(model, ids) - want).abs().max() < 0.02 * want.abs().max()
    with torch.no_grad():  # a prompt: the int4 product (int8 activations) where integer_prompts, else dequantized
        assert (model(ids).logits[0] - want).abs().max() < 0.02 * want.abs().max()
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    loaded, _ = load_model(tmp_path / "g128", parser.parse_args(["--int4", "--cpu-only"]))
    assert isinstance(loaded.lm_head, Int8Linear) and loaded.transformer.h[0].mlp.w1.use_qwen_kernel


def test_load_options(quantized):
    folder = quantized[8]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, trust_remote_code=True,
                                                 attn_implementation="eager", device_map="cpu")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert model.generation_config.chat_format == "chatml"
    auto = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert auto.dtype == torch.float16  # the folder's stored dtype
    base = AutoModel.from_pretrained(folder)
    assert isinstance(base, QWenModel) and base.h[1].mlp.w2.weight.dtype == torch.float32
    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == []


# ----- folders written by hand in the original layout ---------------------------------------------


def write_gptq_folder(out: Path, bits: int = 4, *, in_config: bool = True, quantize_config: bool = False,
                      desc_act: bool = False, shards: int = 1, drop: tuple[str, ...] = (), qc_extra=None,
                      hidden: int = 64, intermediate: int = 256, group: int = 32) -> dict:
    """A GPTQ Qwen folder built from first principles (not with qwen.gptq's writer): random integers,
    scales and zeros packed per the v1 layout. Returns the expected dequantized weights."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(bits)
    config = original_config(2, hidden, 4, intermediate, 151936, 8192, fp16=True)
    shapes = weight_shapes(config)
    per = 32 // bits
    tensors, expected = {}, {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        if not (module.startswith("transformer.h.") and module.split(".", 3)[3] in BLOCK_LINEARS):
            tensors[name] = (0.02 * torch.randn(shape, generator=gen) + (1 if "ln" in name else 0)).half()
            continue
        if name.endswith(".bias"):
            tensors[name] = (0.1 * torch.randn(shape, generator=gen)).half()
            continue
        out_f, in_f = shape
        q = torch.randint(0, 2**bits, (in_f, out_f), generator=gen)
        zeros = torch.randint(1, 2**bits, (in_f // group, out_f), generator=gen)
        scales = (0.001 + 0.01 * torch.rand(in_f // group, out_f, generator=gen)).half()
        g_idx = torch.arange(in_f) // group
        if desc_act:
            g_idx = g_idx[torch.randperm(in_f, generator=gen)]
        words = torch.zeros(in_f // per, out_f, dtype=torch.int64)
        zwords = torch.zeros(in_f // group, out_f // per, dtype=torch.int64)
        for k in range(per):  # value j of each word lives in bits [j*bits, (j+1)*bits)
            words |= q[k::per] << (bits * k)
            zwords |= (zeros[:, k::per] - 1) << (bits * k)
        to_i32 = lambda w: torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)  # noqa: E731
        tensors.update({f"{module}.qweight": to_i32(words), f"{module}.qzeros": to_i32(zwords),
                        f"{module}.scales": scales, f"{module}.g_idx": g_idx.to(torch.int32)})
        expected[module] = (scales.float()[g_idx] * (q - zeros[g_idx]).float()).t()
    for key in drop:
        tensors.pop(key)
    qc = {"bits": bits, "group_size": group, "damp_percent": 0.01, "desc_act": desc_act, "static_groups": False,
          "sym": False, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
          **(qc_extra or {})}
    if in_config:
        config["quantization_config"] = {**qc, "quant_method": "gptq"}
    (out / "config.json").write_text(json.dumps(config))
    if quantize_config:
        (out / "quantize_config.json").write_text(json.dumps(qc))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for n in range(shards):
            fname = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[n::shards]}
            save_file(part, out / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tiny = make_tiny_checkpoint(out / "_src", layers=1)
    for name in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json", "modeling_qwen.py"):
        (out / name).write_bytes((tiny / name).read_bytes())
    return {"expected": expected, "tensors": tensors}


def assert_weights(model, expected):
    for module, weight in expected.items():
        got = model.get_submodule(module).weight.float()
        torch.testing.assert_close(got, weight, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(("bits", "desc_act", "shards"), [(4, False, 1), (8, False, 2), (4, True, 2), (2, False, 1)])
def test_hand_built_folder_loads(tmp_path, bits, desc_act, shards):
    built = write_gptq_folder(tmp_path / "q", bits, desc_act=desc_act, shards=shards)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True)
    assert model.dtype == torch.float16  # config.json's fp16 flag, as for the released folders
    assert_weights(model, built["expected"])
    torch.testing.assert_close(model.transformer.h[1].attn.c_attn.bias,
                               built["tensors"]["transformer.h.1.attn.c_attn.bias"])
    torch.testing.assert_close(model.lm_head.weight, built["tensors"]["lm_head.weight"])
    with torch.no_grad():
        assert torch.isfinite(model.float()(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="needs a CPU with avx512_bf16")
def test_bf16_gptq_folder_on_the_cpu_decodes_through_the_bf16_kernel(tmp_path):
    write_gptq_folder(tmp_path / "q", 4, desc_act=False, shards=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16, gptq_backend="int8")
    assert isinstance(model.lm_head, Bf16Linear)  # stored 16-bit, as in the released folders
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)


def test_quantize_config_json_only_folder_loads(tmp_path):
    built = write_gptq_folder(tmp_path / "q", 4, in_config=False, quantize_config=True)
    assert "quantization_config" not in json.loads((tmp_path / "q" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert_weights(model, built["expected"])


def test_gptq_v2_checkpoint_format(tmp_path):
    # gptqmodel's internal format stores zero itself: the same integers read one step lower.
    built = write_gptq_folder(tmp_path / "q", 4, qc_extra={"checkpoint_format": "gptq_v2"})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    w = model.transformer.h[0].mlp.w1.weight
    t = built["tensors"]
    scales = t["transformer.h.0.mlp.w1.scales"].float()[t["transformer.h.0.mlp.w1.g_idx"].long()].t()
    torch.testing.assert_close(w - built["expected"]["transformer.h.0.mlp.w1"], scales, rtol=1e-3, atol=1e-5)


# ----- errors -------------------------------------------------------------------------------------


def test_unsupported_bits_is_a_clear_error(tmp_path):
    write_gptq_folder(tmp_path / "q", 4, qc_extra={"bits": 3})
    with pytest.raises(GPTQError, match=r"bits 3 is not supported.*gptq_backend='gptqmodel'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_missing_tensors_are_named(tmp_path):
    write_gptq_folder(tmp_path / "q", 4, drop=("transformer.h.1.mlp.w2.qzeros", "transformer.ln_f.weight"))
    with pytest.raises(GPTQError, match=r"lacks 2 tensors.*transformer\.h\.1\.mlp\.w2\.qzeros"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_bits_that_do_not_match_the_tensors(tmp_path):
    write_gptq_folder(tmp_path / "q", 4, qc_extra={"bits": 8})
    with pytest.raises(GPTQError, match=r"qweight has shape .*Check 'bits'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_other_checkpoint_formats_are_refused(tmp_path):
    write_gptq_folder(tmp_path / "q", 4, qc_extra={"checkpoint_format": "marlin"})
    with pytest.raises(GPTQError, match="checkpoint_format 'marlin'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_backend_arguments(tmp_path, tiny_chat):
    write_gptq_folder(tmp_path / "q", 4)
    with pytest.raises(GPTQError, match="gptq_backend must be one of"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", gptq_backend="exllama")
    with pytest.raises(GPTQError, match="not a GPTQ checkpoint"):
        AutoModelForCausalLM.from_pretrained(tiny_chat, gptq_backend="int8")
    if not gptqmodel_available():
        with pytest.raises(ImportError, match=r'pip install -e "\.\[quant\]".*CUDA build of PyTorch'):
            AutoModelForCausalLM.from_pretrained(tmp_path / "q", gptq_backend="gptqmodel")
        # transformers' GPTQConfig (Q-LoRA passes one) asks for the gptqmodel path too
        with pytest.raises(ImportError, match=r"needs gptqmodel"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=GPTQConfig(bits=4))


def test_run_gptq_refuses_bad_input(tmp_path, fp32_folder, calib_file):
    from qwen.gptq import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "conversations": [{"from": "system", "value": "x"}]}]))
    with pytest.raises(SystemExit) as exc:
        main(["--model_name_or_path", str(fp32_folder), "--data_path", str(bad), "--out_path", str(tmp_path / "o")])
    assert exc.value.code == 2
    write_gptq_folder(tmp_path / "q", 4)
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", str(tmp_path / "q"), "--data_path", str(calib_file),
              "--out_path", str(tmp_path / "o")])


@pytest.mark.skipif(not gptqmodel_available(), reason="gptqmodel + optimum (the quant extra) are not installed")
def test_gptqmodel_reads_our_folder_like_we_do(quantized):
    """transformers' GPTQ integration with gptqmodel's kernels (the original tools' path) computes the
    same layers from a run_gptq.py folder as the plain-PyTorch loader."""
    ours = AutoModelForCausalLM.from_pretrained(quantized[4], gptq_backend="dequant")
    theirs = AutoModelForCausalLM.from_pretrained(quantized[4], gptq_backend="gptqmodel", dtype=torch.bfloat16)
    for name in BLOCK_LINEARS:
        want = ours.transformer.h[1].get_submodule(name).weight
        layer = theirs.transformer.h[1].get_submodule(name)
        with torch.no_grad():
            got = layer(torch.eye(want.shape[1], dtype=torch.bfloat16)).float().t()
        if getattr(layer, "bias", None) is not None:
            got -= layer.bias.float()[:, None]
        assert (got - want).abs().max() < 0.01 * want.abs().max()
