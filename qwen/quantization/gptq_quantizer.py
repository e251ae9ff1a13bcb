"""Making GPTQ folders: the GPTQ algorithm, layer by layer on calibration conversations, and the writer.

Making a folder (``python run_gptq.py --model_name_or_path ... --data_path ... --out_path ...``) runs
the GPTQ algorithm layer by layer on calibration conversations: see :func:`quantize_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .gptq_format import (
    SUPPORTED_BITS,
    GPTQError,
    GPTQSettings,
    dequantize_layer,
    find_gptq_config,
    pack_layer,
    values_per_word,
)

logger = logging.getLogger(__name__)

# true_sequential: each step's inputs are taken after the steps before it were quantized.
SEQUENTIAL_STEPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))


# ----- the GPTQ algorithm -------------------------------------------------------------------------


class Hessian:
    """H = 2/N * sum over samples of X^T X for one layer's inputs (a running mean, as AutoGPTQ keeps it)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        self.H *= self.samples / (self.samples + batch)
        self.samples += batch
        x = x * math.sqrt(2 / self.samples)
        self.H.addmm_(x.t(), x)


def _grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [out, n] (AutoGPTQ's Quantizer.find_params, per channel).

    The scale is rounded to fp16 first, so the packed folder dequantizes to exactly the values the
    error propagation assumed.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).float().clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # [out, in] integers in 0..2^bits-1
    scales: torch.Tensor  # [groups, out] (fp16 values)
    zeros: torch.Tensor  # [groups, out] integers
    g_idx: torch.Tensor  # [in]


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    sym: bool = True,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] with GPTQ (Frantar et al. 2022) given the Hessian ``H`` [in, in] of its inputs.

    Columns are quantized in order (largest diag(H) first with ``desc_act``) and each one's rounding
    error is spread over the columns not yet quantized through the Cholesky factor of H^-1, in
    blocks of ``block_size`` columns. A group's scale and zero point are taken when the loop
    reaches its first column, from the weights as updated so far. ``sym``: zero = 2^(bits-1).
    Asymmetric zero points are kept >= 1 because the v1 format stores zero - 1.
    """
    W = weight.detach().to(torch.float32).clone()
    out_f, in_f = W.shape
    H = H.to(W.device, torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp_percent)
    gs = group_size if group_size > 0 else in_f
    n_groups = math.ceil(in_f / gs)
    scales = torch.zeros(n_groups, out_f, device=W.device)
    zeros = torch.zeros(n_groups, out_f, device=W.device)
    Q = torch.zeros(out_f, in_f, dtype=torch.int32, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _one_thread(W.device):
            _quantize_block(W, W1, Err1, Hinv1, Q, scales, zeros, i1, i2, gs, bits, sym)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = torch.arange(in_f, device=W.device) // gs
    if perm is not None:
        inverse = torch.argsort(perm)
        Q, g_idx = Q[:, inverse], g_idx[inverse]
    return QuantizedWeight(Q, scales, zeros.to(torch.int32), g_idx.to(torch.int32))


def _quantize_block(W, W1, Err1, Hinv1, Q, scales, zeros, i1: int, i2: int, gs: int, bits: int, sym: bool) -> None:
    """Quantize columns i1..i2 one by one (W1 = W[:, i1:i2], updated in place), spreading each error
    over the block's later columns; record the errors in Err1 for the update of the columns after it."""
    maxq = 2**bits - 1
    scale = scales[(i1 - 1) // gs] if i1 % gs else None
    zero = zeros[(i1 - 1) // gs] if i1 % gs else None
    for i in range(i2 - i1):
        col = i1 + i
        if col % gs == 0:
            g = col // gs
            span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
            scale, zero = _grid(span, bits, sym)
            scales[g], zeros[g] = scale, zero
        w = W1[:, i]
        q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
        Q[:, col] = q.to(torch.int32)
        err = (w - scale * (q - zero)) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Err1[:, i] = err


class _one_thread:
    """Run a CPU loop of many small tensor ops on one thread: with several, each tiny op pays a
    thread-pool round trip (25x slower on a busy 2-core machine). No effect on GPU tensors."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = device.type == "cpu"

    def __enter__(self) -> None:
        if self.cpu:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.cpu:
            torch.set_num_threads(self.threads)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; the damping grows tenfold if H is not
    positive definite (too little calibration data for the layer's width)."""
    idx = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    for _ in range(5):
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                if damp != damp_percent:
                    logger.warning("GPTQ: Hessian needed damp %.3g instead of %.3g", damp, damp_percent)
                return U
        damp *= 10
    raise GPTQError("GPTQ: the Hessian is not positive definite even with heavy damping; use more calibration data")


def rtn_quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest with the same grid as GPTQ (the baseline GPTQ improves on)."""
    W = weight.detach().float()
    out_f, in_f = W.shape
    gs = group_size if group_size > 0 else in_f
    scales, zeros, qs = [], [], []
    for g0 in range(0, in_f, gs):
        scale, zero = _grid(W[:, g0 : g0 + gs], bits, sym)
        q = torch.clamp(torch.round(W[:, g0 : g0 + gs] / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
        scales.append(scale)
        zeros.append(zero)
        qs.append(q)
    g_idx = torch.arange(in_f) // gs
    return QuantizedWeight(torch.cat(qs, 1).int(), torch.stack(scales), torch.stack(zeros).int(), g_idx.int())


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed inputs were seen."""


def _collect_hessians(block, modules: dict[str, nn.Linear], states, rest, device) -> dict[str, Hessian]:
    """Run ``block`` on every sample and accumulate H of each module's inputs; a pass stops as soon as
    every module has seen its input."""
    hessians = {n: Hessian(m.in_features, device) for n, m in modules.items()}
    seen: set[str] = set()

    def hook(name: str):
        def record(module, inputs, output):
            hessians[name].add(inputs[0])
            seen.add(name)
            if len(seen) == len(modules):
                raise _Stop

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for h, (args, kwargs) in zip(states, rest, strict=True):
            seen.clear()
            try:
                block(h, *args, **kwargs)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


@torch.no_grad()
def quantize_model(
    model,
    samples: Sequence[Sequence[int]],
    bits: int = 4,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    true_sequential: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize every Linear inside the blocks of a QWenLMHeadModel with GPTQ; return the packed tensors.

    Layer by layer: the block's inputs for every calibration sample (batch 1, as the original ran)
    are captured; for each step of ``SEQUENTIAL_STEPS`` (attn.c_attn; attn.c_proj; mlp.w1 + mlp.w2;
    mlp.c_proj) the inputs of its layers are accumulated into H, and each layer is quantized and
    its weight replaced by the dequantized result, so later steps see the quantized earlier ones;
    then the block is run again to give the next block its inputs. Blocks move to ``device`` one at
    a time (the rest of the model stays where it is). Returns ``{"transformer.h.{i}.attn.c_attn":
    {"qweight", "qzeros", "scales", "g_idx", "bias"?}, ...}`` in the v1 layout.
    """
    from tqdm.auto import tqdm

    values_per_word(bits)
    blocks = model.transformer.h
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.transformer.wte.to(device)

    states, rest = [], []

    def capture(module, args, kwargs):
        states.append(args[0])
        rest.append((args[1:], kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model.transformer(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not states:
        raise GPTQError("GPTQ needs at least one calibration sample")

    packed: dict[str, dict[str, torch.Tensor]] = {}
    steps = SEQUENTIAL_STEPS if true_sequential else (tuple(n for s in SEQUENTIAL_STEPS for n in s),)
    bar = tqdm(total=len(blocks) * sum(len(s) for s in steps), desc="GPTQ", unit="layer", disable=not progress)
    for index, block in enumerate(blocks):
        block.to(device)
        for names in steps:
            modules = {n: block.get_submodule(n) for n in names}
            hessians = _collect_hessians(block, modules, states, rest, device)
            for name, module in modules.items():
                bar.set_postfix_str(f"block {index} {name}")
                result = gptq_quantize_weight(module.weight, hessians[name].H, bits, group_size, damp_percent, desc_act)
                tensors = pack_layer(result.q, result.scales, result.zeros, result.g_idx, bits, module.bias)
                module.weight.data = dequantize_layer(tensors, bits, dtype=module.weight.dtype)
                packed[f"transformer.h.{index}.{name}"] = {k: v.cpu() for k, v in tensors.items()}
                bar.update()
            del hessians
        if index + 1 < len(blocks):
            states = [block(h, *args, **kwargs) for h, (args, kwargs) in zip(states, rest, strict=True)]
        block.to(home)
    bar.close()
    model.transformer.wte.to(home)
    return packed


# ----- writing a folder ---------------------------------------------------------------------------

# Files copied from the source folder beside the weights: tokenizer, generation config, and the
# original remote code (the original tools load a folder through it).
_COPIED = ("qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_COPIED_SUFFIXES = (".py", ".cu", ".cpp", ".h")


def save_gptq_folder(
    model,
    packed: dict[str, dict[str, torch.Tensor]],
    out_path: str | Path,
    settings: GPTQSettings,
    source: str | Path | None = None,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    max_shard_size: str = "4GB",
) -> Path:
    """Write a GPTQ folder in the layout of the released -Int4/-Int8 checkpoints.

    Packed layers keep their original key names (``transformer.h.{i}.attn.c_attn.qweight`` ...);
    every other tensor is stored as fp16. config.json is the source's own (remote-code auto_map and
    all) plus ``quantization_config``; quantize_config.json carries the same settings for AutoGPTQ.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module not in packed:
            state[name] = t.detach().to("cpu", torch.float16).contiguous()
    for module, tensors in packed.items():
        state.update({f"{module}.{k}": v for k, v in tensors.items()})
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})

    qc = settings.to_dict(damp_percent, true_sequential)
    src = Path(source) if source is not None and Path(source).is_dir() else None
    if src is not None and (src / "config.json").is_file():
        config = json.loads((src / "config.json").read_text())
    else:
        config = model.config.to_dict()
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items()}, indent=2))
    if src is not None:
        for f in src.iterdir():
            if f.is_file() and (f.name in _COPIED or f.suffix in _COPIED_SUFFIXES):
                shutil.copyfile(f, out / f.name)
    if not (out / "generation_config.json").is_file():
        model.generation_config.to_json_file(out / "generation_config.json")
    return out


def calibration_samples(
    data_path: str | Path, tokenizer, max_len: int, num_samples: int | None = None
) -> list[list[int]]:
    """Token ids of the fine-tune-format conversations in ``data_path`` as ChatML (system block first),
    cut to ``max_len``, as the original run_gptq.py prepared them."""
    from ..finetune_data import DEFAULT_SYSTEM, encode_conversation, load_conversations

    samples = load_conversations(data_path)[:num_samples]
    ids = [encode_conversation(tokenizer, s["conversations"], s.get("system", DEFAULT_SYSTEM))[0] for s in samples]
    return [x[:max_len] for x in ids if x]


def quantize_folder(
    model_name_or_path: str | Path,
    samples: Sequence[Sequence[int]],
    out_path: str | Path,
    bits: int = 4,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    true_sequential: bool = True,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Load an unquantized Qwen folder, quantize it with GPTQ on ``samples`` and write the GPTQ folder."""
    from transformers import AutoModelForCausalLM

    from ..modeling import QWenLMHeadModel

    if find_gptq_config(model_name_or_path) is not None:
        raise GPTQError(f"{model_name_or_path} is already a GPTQ checkpoint; quantize the unquantized model instead")
    if group_size != -1 and group_size <= 0:
        raise GPTQError(f"--group-size must be positive or -1, got {group_size}")
    settings = GPTQSettings(bits=bits, group_size=group_size, desc_act=desc_act, sym=True, model_file_base_name="model")
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype)
    if not isinstance(model, QWenLMHeadModel):
        raise GPTQError(f"{model_name_or_path} is not a Qwen v1 checkpoint")
    model.eval()
    packed = quantize_model(model, samples, bits, group_size, damp_percent, desc_act, true_sequential, device, progress)
    source = Path(str(model_name_or_path))
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(str(model_name_or_path)))
    return save_gptq_folder(model, packed, out_path, settings, source, damp_percent, true_sequential)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="run_gptq.py",
        description="Quantize a Qwen v1 checkpoint to GPTQ Int4/Int8 (the -Int4/-Int8 folder layout) with "
        "calibration conversations in the fine-tune data format. Pure PyTorch: CPU or one GPU.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="unquantized Qwen folder (or Hub id in the cache)")
    parser.add_argument("--data_path", required=True,
                        help='calibration data: JSON list of {"id", "conversations": [{"from", "value"}, ...]}')
    parser.add_argument("--out_path", required=True, help="folder to write")
    parser.add_argument("--max_len", type=int, default=8192, help="cut each calibration sample to this many tokens")
    parser.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    parser.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=128,
                        help="input channels per scale/zero (-1: one group per row)")
    parser.add_argument("--damp_percent", type=float, default=0.01, help="dampening of H, a fraction of mean(diag H)")
    parser.add_argument("--desc_act", action="store_true",
                        help="act-order: quantize columns by decreasing Hessian diagonal (the original used false)")
    parser.add_argument("--num_samples", type=int, default=None, help="use only the first N samples of the data")
    parser.add_argument("--device", default=None,
                        help="where blocks are quantized (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="load dtype for the calibration forward passes (default: the checkpoint's rule)")
    args = parser.parse_args(argv)
    if args.max_len <= 0:
        parser.error("--max_len must be positive")

    from transformers import AutoTokenizer

    import qwen  # noqa: F401  (registers the Auto classes)

    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    try:
        samples = calibration_samples(args.data_path, tokenizer, args.max_len, args.num_samples)
    except ValueError as exc:
        parser.exit(2, f"run_gptq.py: error: {exc}\n")
    tokens = sum(len(s) for s in samples)
    print(f"calibration: {len(samples)} samples, {tokens} tokens (max_len {args.max_len}); device {device}")
    try:
        out = quantize_folder(
            args.model_name_or_path, samples, args.out_path, args.bits, args.group_size, args.damp_percent,
            args.desc_act, True, device, getattr(torch, args.dtype) if args.dtype else None,
        )
    except GPTQError as exc:
        parser.exit(2, f"run_gptq.py: error: {exc}\n")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.bits}-bit GPTQ (group size {args.group_size}) to {out}: {size / 2**20:.1f} MiB of weights "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
