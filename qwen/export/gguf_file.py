"""Export a Qwen v1 folder as one GGUF file for llama.cpp's ``qwen`` architecture (and everything built on
llama.cpp: llama-cpp-python, Ollama, LM Studio).

llama.cpp's own converter reads a Qwen v1 folder only through its remote-code tokenizer, and the file it
writes from an original config.json lacks ``qwen.attention.layer_norm_rms_epsilon`` (the config names it
``layer_norm_epsilon``), which llama.cpp's loader requires, and the rotary base (``rotary_emb_base``). This
writer takes the facts from llama.cpp's loader instead (src/models/qwen.cpp, llama-model.cpp, llama-vocab.cpp
of llama-cpp-python 0.3.36): the original tensors keep their layout (``c_attn`` stays fused as
``attn_qkv``; ``w1`` is ``ffn_up``, ``w2`` the gate), ``feed_forward_length`` is the original
``intermediate_size`` (the loader halves it), and the vocabulary is a GPT-2-style BPE with Qwen's merges
and llama.cpp's ``qwen2`` pre-tokenizer (Qwen v1's split pattern). Tensors stream from the source one at a
time. llama.cpp has no dynamic NTK or logn: outputs follow qwen's below ``seq_length``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END
from .source import ExportError, ExportReport, Source, open_source
from .staging import check_destination, staged
from .tokenizer_json import bpe_merges, fast_tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
PRE_TOKENIZER = "qwen2"  # llama.cpp's name for Qwen's split pattern (LLAMA_VOCAB_PRE_TYPE_QWEN2)
ARCH = "qwen"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError('GGUF export needs the gguf package: pip install -e ".[export]" (or pip install gguf)') \
            from None
    return gguf


def gguf_tensor_names(num_layers: int) -> dict[str, str]:
    """Original key -> GGUF tensor name of llama.cpp's ``qwen`` architecture."""
    gguf = _gguf()
    t, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    out = {"transformer.wte.weight": names[t.TOKEN_EMBD] + ".weight"}
    per_block = {
        "ln_1.weight": (t.ATTN_NORM, "weight"),
        "attn.c_attn.weight": (t.ATTN_QKV, "weight"),
        "attn.c_attn.bias": (t.ATTN_QKV, "bias"),
        "attn.c_proj.weight": (t.ATTN_OUT, "weight"),
        "ln_2.weight": (t.FFN_NORM, "weight"),
        "mlp.w1.weight": (t.FFN_UP, "weight"),  # Qwen: c_proj(w1(x) * silu(w2(x))); llama.cpp: down(up * silu(gate))
        "mlp.w2.weight": (t.FFN_GATE, "weight"),
        "mlp.c_proj.weight": (t.FFN_DOWN, "weight"),
    }
    for i in range(num_layers):
        for key, (tensor, suffix) in per_block.items():
            out[f"transformer.h.{i}.{key}"] = names[tensor].format(bid=i) + "." + suffix
    out["transformer.ln_f.weight"] = names[t.OUTPUT_NORM] + ".weight"
    out["lm_head.weight"] = names[t.OUTPUT] + ".weight"
    return out


def export_gguf(src: str | Path, dst: str | Path, *, outtype: str = "bf16", overwrite: bool = False) -> ExportReport:
    """Write ``dst`` (a .gguf file).

    ``outtype``: "f32", "f16", "bf16" or "q8_0" for the matrices; norms and biases stay f32, as llama.cpp's
    converter keeps them. Raises :class:`ExportError` before writing when the source or DST is unusable.
    """
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    dst = Path(dst).expanduser()
    if dst.suffix != ".gguf":
        raise ExportError(f"DST {dst} must be a file name ending in .gguf")
    source = open_source(src)
    check_destination(dst, source.folder, overwrite)
    config = source.config
    if any(config.layer_windows()):
        raise ExportError(f"{source.folder} uses window attention, which llama.cpp's qwen architecture does not "
                          f"have; export it with use_window_attn false in config.json, or use the qwen2 export")
    plan = _tensor_plan(source, outtype, gguf)
    tokenizer = source.tokenizer()
    chat = source.is_chat()
    fast = fast_tokenizer(tokenizer)
    with staged(dst, sum(nbytes for _, _, _, nbytes in plan.values()) + 64 * 1024**2) as temp:
        writer = gguf.GGUFWriter(str(temp), ARCH)
        try:
            _write_metadata(writer, source, outtype, gguf)
            _write_vocab(writer, tokenizer, fast, chat, config.vocab_size, gguf)
            for name, (_, shape, qtype, nbytes) in plan.items():
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _name, (key, _, qtype, _) in plan.items():
                writer.write_tensor_data(_encode(source.tensor(key), qtype, gguf))
        finally:
            writer.close()
    notes = [f"GGUF for llama.cpp's {ARCH!r} architecture: {len(plan)} tensors ({outtype} matrices, f32 norms and "
             f"biases), BPE vocabulary of {config.vocab_size} with merges, pre-tokenizer {PRE_TOKENIZER!r}",
             f"context {config.seq_length} tokens: llama.cpp has no dynamic NTK/logn, so outputs follow qwen's below "
             f"{config.seq_length} tokens only"]
    if source.gptq is not None:
        notes.append(f"GPTQ source ({source.gptq.bits}-bit): written dequantized")
    return ExportReport(dst, notes)


def _tensor_plan(source: Source, outtype: str, gguf) -> dict[str, tuple[str, tuple[int, ...], object, int]]:
    """GGUF name -> (original key, shape, GGML type, bytes). 1-D tensors stay F32; a matrix whose rows do not
    split into Q8_0 blocks of 32 falls back to F16, as llama.cpp's converter does."""
    q = gguf.GGMLQuantizationType
    wanted = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[outtype]
    names = gguf_tensor_names(source.config.num_hidden_layers)
    plan = {}
    for key, shape in source.shapes.items():
        qtype = q.F32 if len(shape) == 1 else wanted
        if qtype == q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
            qtype = q.F16
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        numel = int(np.prod(shape))
        plan[names[key]] = (key, tuple(shape), qtype, numel // block * type_size)
    return plan


def _encode(tensor: torch.Tensor, qtype, gguf) -> np.ndarray:
    q = gguf.GGMLQuantizationType
    if qtype == q.BF16:  # round to nearest even, as llama.cpp's converter does
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()
    data = tensor.to(torch.float32).numpy()
    if qtype == q.F32:
        return data
    if qtype == q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _write_metadata(writer, source: Source, outtype: str, gguf) -> None:
    c = source.config
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_name(source.folder.name)
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.seq_length)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)  # the whole of it: the qwen loader takes half per branch
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_attention_heads)
    writer.add_rope_dimension_count(int(c.head_dim * c.rotary_pct))
    writer.add_rope_freq_base(float(c.rotary_emb_base))
    writer.add_layer_norm_rms_eps(c.layer_norm_epsilon)


def _write_vocab(writer, tokenizer, fast, chat: bool, vocab_size: int, gguf) -> None:
    """Tokens for every embedding row (the padding rows as unused ``[PAD{i}]``), special tokens as control
    tokens, Qwen's merges; no BOS is added (Qwen has none); eos as in the exported tokenizer_config.json."""
    if len(tokenizer) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {vocab_size} rows; "
                          f"the vocabulary files do not belong to this model")
    by_id = {i: tok for tok, i in fast.get_vocab(with_added_tokens=True).items()}
    specials = set(tokenizer.special_tokens.values())
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(fast))
    eod = tokenizer.special_tokens[ENDOFTEXT]
    writer.add_bos_token_id(eod)
    writer.add_eos_token_id(tokenizer.special_tokens[IM_END] if chat else eod)
    writer.add_pad_token_id(eod)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
