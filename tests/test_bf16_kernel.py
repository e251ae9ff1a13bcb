"""qwen's bf16 CPU kernel (``torch.ops.qwen.bf16_matmul``: AMX tiles where the CPU has them, AVX-512 BF16) and
``Bf16Linear``: against a float64 reference over odd shapes and tails on both paths, the fallbacks (gradients,
prompts, other dtypes), and bf16 models loaded on the CPU, which decode through it, each sequence to the same
bits alone and in a batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qwen import cpu_kernels
from qwen.cpu_kernels import Bf16Linear, qwen_bf16_kernel, use_cpu_kernels_
from qwen.engine import Engine
from qwen.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="needs a CPU with avx512_bf16")
needs_amx = pytest.mark.skipif(not cpu_kernels.BF16_AMX, reason="needs a CPU with AMX (and QWEN_BF16_AMX not 0)")
# Both paths where this CPU has AMX (amx=True falls back to AVX-512 where it has not, and is then that path again).
PATHS = [pytest.param(True, id="amx", marks=needs_amx), pytest.param(False, id="avx512")]


@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17, 32, 33])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (33, 37), (100, 2048), (5504, 64), (64, 5504)])
def test_kernel_equals_float64_reference(rows, n, k, amx):
    """Shapes that take AMX's tiles in part (100 = 6 blocks of 16 weight rows + 4 on AVX-512; one or two tiles of
    activation rows, 33 = a second pass), and shapes it leaves to AVX-512 (n < 16, k not a multiple of 32)."""
    op = qwen_bf16_kernel()
    assert op is not None  # built on this machine, or the test is pointless
    g = torch.Generator().manual_seed(rows * n + k)
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    ref = x.double() @ w.double().t() + bias.double()
    got = op(x, w, bias, amx)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # fp32 accumulation, one bf16 rounding of the result (relative 2^-8)
    assert ((got.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-3 * k**0.5).all()


@pytest.mark.parametrize("amx", PATHS)
def test_a_rows_output_does_not_depend_on_the_rows_beside_it(amx):
    """Each activation row gets the same arithmetic however many rows come with it (AMX: tiles of 16 weight rows
    times up to 32 activation rows, per element the same sum; AVX-512: passes of up to 8 rows over whole weight
    rows), so a decode step the kernel serves gives a sequence the same output to the bit alone and in a batch."""
    op = qwen_bf16_kernel()
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(40, 5504, generator=g).bfloat16(), torch.randn(56, 5504, generator=g).bfloat16()
    full = op(x, w, None, amx)
    for rows in (1, 3, 8, 16, 17, 32, 33):
        assert torch.equal(op(x[:rows], w, None, amx), full[:rows])
    assert all(torch.equal(op(x[i : i + 1], w, None, amx)[0], full[i]) for i in range(40))


def test_the_bias_is_added_before_the_one_rounding_and_a_strided_weight_is_refused():
    op = qwen_bf16_kernel()
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 64, generator=g).bfloat16(), torch.randn(48, 64, generator=g).bfloat16()
    bias = (torch.randn(48, generator=g) * 100).bfloat16()  # large: rounding before adding it would show
    ref = (x.double() @ w.double().t() + bias.double()).bfloat16()  # rounded once, as F.linear does
    assert torch.equal(op(x, w, bias), ref)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x, w.t().contiguous().t())


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch):
    """torch keeps a ``lock`` file in the build folder while it compiles and waits, forever and silently, while
    one exists: a build killed half-way used to hang every later load. An old lock is removed with a word."""
    import os
    import time

    from test_int8_kernel import run_python  # tests/ is on sys.path

    from qwen.cpu_kernels import build_folder

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))  # where run_python builds
    folder = build_folder("bf16_matvec")
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    result = run_python("from qwen.cpu_kernels import qwen_bf16_kernel; print(qwen_bf16_kernel() is not None)",
                        tmp_path)
    assert result.stdout.strip() == "True", result.stderr
    assert "did not finish" in result.stderr and not lock.exists()


def test_a_build_in_progress_is_waited_for_and_said(tmp_path, caplog):
    import threading

    from qwen.cpu_kernels import wait_for_build_lock

    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(1.0, lock.unlink).start()  # the other build finishing
    with caplog.at_level("WARNING", logger="qwen.cpu_kernels"):
        wait_for_build_lock(lock, "bf16")
    assert "waiting for another process" in caplog.text and not lock.exists()


def test_linear_uses_the_kernel_only_for_decoding():
    linear = nn.Linear(64, 48).bfloat16()
    reference = nn.Linear(64, 48).bfloat16()
    reference.load_state_dict(linear.state_dict())
    use_cpu_kernels_(linear)
    assert type(linear) is Bf16Linear and linear.state_dict().keys() == reference.state_dict().keys()
    calls = []
    op = torch.ops.qwen.bf16_matmul.default
    with torch.no_grad(), _count(op, calls):
        x = torch.randn(3, 1, 64).bfloat16()  # a decode step: one token for each sequence
        torch.testing.assert_close(linear(x), reference(x), rtol=2e-2, atol=2e-2)
        linear(torch.randn(1, 2, 64).bfloat16())  # a prompt's tokens: PyTorch's matmul
        assert len(calls) == 1
        linear(torch.randn(40, 1, 64).bfloat16())  # a decode step of many sequences: the kernel too
        assert len(calls) == 2
        linear.float()(torch.randn(1, 64))  # fp32: PyTorch's
    assert len(calls) == 2
    linear.bfloat16()
    x = torch.randn(1, 64).bfloat16().requires_grad_()
    linear(x).sum().backward()  # training takes PyTorch's path, which has a backward
    assert x.grad is not None and linear.weight.grad is not None


class _count(torch.overrides.TorchFunctionMode):
    """Count calls of one op (the test's view of which path ran)."""

    def __init__(self, op, calls: list) -> None:
        super().__init__()
        self.op, self.calls = op, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (self.op, self.op.overloadpacket):
            self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_bf16_model_on_the_cpu_decodes_through_the_kernel(tiny_chat, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.bfloat16).eval()
    assert isinstance(model.lm_head, Bf16Linear) and isinstance(model.transformer.h[0].attn.c_attn, Bf16Linear)
    plain = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.bfloat16).eval()
    for module in plain.modules():
        if isinstance(module, Bf16Linear):
            module.__class__ = nn.Linear
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    with torch.no_grad():
        ours, theirs = (m(torch.tensor([ids])).logits[0, -1].float() for m in (model, plain))
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.999
    seq = Engine(model, tokenizer).generate([ids], SamplingParams(max_new_tokens=8, do_sample=False))[0]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, repetition_penalty=1.0,
                              eos_token_id=None)[0, len(ids):].tolist()
    assert seq.output_ids == expected
    assert AutoModelForCausalLM.from_pretrained(tiny_chat).lm_head.__class__ is nn.Linear  # fp32: untouched


@pytest.fixture(scope="module")
def wide_bf16(tmp_path_factory):
    """A model wide enough (512 inputs to a layer, 2048 to the MLP's c_proj) that PyTorch's matmul and the kernel
    round some outputs apart: on the 64-wide tiny checkpoint the two agree to the bit."""
    from qwen.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "m", hidden=512, heads=8, intermediate=4096, seed=5)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("amx", [*PATHS, pytest.param(None, id="batch-on-pytorch")])
def test_a_decode_step_gives_a_sequence_the_same_numbers_alone_and_in_a_batch(wide_bf16, monkeypatch, amx):
    """Six sequences decoding together and each alone from the same keys and values: the same logits to the bit at
    every step, on either path, since every decode step takes the kernel, which gives a row the same arithmetic
    whatever its batch. The check that this test can fail (``batch-on-pytorch``): a batch sent to PyTorch's matmul,
    as a choice of path by the batch's size would, rounds apart from the kernel alone. (Left out: a prompt's
    matmul is oneDNN's, whose rounding can depend on the rows prefilled with it, and attention over a padded batch
    reduces over more keys than alone.)"""
    from transformers import DynamicCache

    monkeypatch.setattr(cpu_kernels, "BF16_AMX", bool(amx))
    if amx is None:  # the batch's forward on PyTorch's matmul; each sequence alone on the kernel
        batch_forward = Bf16Linear.forward
        monkeypatch.setattr(Bf16Linear, "forward", lambda self, x: (
            nn.Linear.forward(self, x) if x.shape[0] > 1 else batch_forward(self, x)))
    ids = torch.randint(0, 150000, (6, 7), generator=torch.Generator().manual_seed(0))
    same = []
    with torch.no_grad():
        out = wide_bf16(ids, use_cache=True)
        together_cache, alone_caches = out.past_key_values, []
        for row in range(6):
            cache = DynamicCache(config=wide_bf16.config)
            for i, layer in enumerate(together_cache.layers):
                cache.update(layer.keys[row : row + 1].clone(), layer.values[row : row + 1].clone(), i)
            alone_caches.append(cache)
        tokens = out.logits[:, -1].argmax(-1)
        for _ in range(6):
            together = wide_bf16(tokens[:, None], past_key_values=together_cache).logits[:, -1]
            alone = torch.cat([wide_bf16(tokens[row : row + 1, None], past_key_values=cache).logits[:, -1]
                               for row, cache in enumerate(alone_caches)])
            same.append(torch.equal(together, alone))
            tokens = together.argmax(-1)  # both go on with the same tokens
    assert all(same) if amx is not None else not all(same)
