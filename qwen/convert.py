"""Map a Qwen v1 model onto transformers' ``Qwen2ForCausalLM`` (same math, other weight names).

Qwen2's architecture is Qwen v1's without dynamic NTK and logn, with q/k/v split out of the fused
``c_attn``. Below ``seq_length`` the two compute the same function, which makes Qwen2 an
independent reference for tests and benchmarks, and a way to hand a Qwen v1 checkpoint to tools
that know Qwen2 but not Qwen v1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from .config import QWenConfig
from .modeling import QWenLMHeadModel


class SlidingWindowError(ValueError):
    """The model uses several window sizes, which Qwen2's config (one ``sliding_window``) cannot express."""


def qwen2_config(
    model: QWenLMHeadModel | QWenConfig,
    attn_implementation: str = "sdpa",
    rope_parameters: dict | None = None,
    max_position_embeddings: int | None = None,
) -> Qwen2Config:
    """The ``Qwen2Config`` computing what ``model`` (or a model of this config) computes below ``seq_length``.

    ``rope_parameters`` replaces the plain rotary (``rope_type: default``), e.g. with a dynamic-NTK or YaRN
    scaling for contexts past ``seq_length``, which Qwen2 cannot match exactly (qwen.export.rope); such a
    scaling may also move ``max_position_embeddings`` (default ``seq_length``).
    """
    c = model.config if isinstance(model, QWenLMHeadModel) else model
    windows = c.layer_windows()
    sizes = set(windows) - {None}
    if len(sizes) > 1:
        raise SlidingWindowError(
            f"Qwen2 has one sliding window size; this model uses several: {sorted(sizes)}. Use one window size "
            "for every windowed layer (e.g. --window-attn N:N), or none."
        )
    sliding = {}
    if sizes:
        layer_types = ["full_attention" if w is None else "sliding_attention" for w in windows]
        sliding = dict(use_sliding_window=True, sliding_window=sizes.pop(), layer_types=layer_types)
        # Older readers (transformers 4.x, vLLM) derive the windowed layers from max_window_layers instead:
        # layers at or above it slide. Set it where the layout allows (windowed layers on top).
        first = layer_types.index("sliding_attention")
        if all(t == "sliding_attention" for t in layer_types[first:]):
            sliding["max_window_layers"] = first
    rope = rope_parameters or {"rope_type": "default"}
    return Qwen2Config(
        **sliding,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size // 2,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        max_position_embeddings=max_position_embeddings or c.seq_length,
        rms_norm_eps=c.layer_norm_epsilon,
        rope_parameters={**rope, "rope_theta": float(c.rotary_emb_base)},
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )


def qwen2_key_map(num_layers: int) -> dict[str, tuple[str, int | None]]:
    """Qwen2 key -> (Qwen v1 key, part): ``part`` 0/1/2 takes the q/k/v third of the fused ``c_attn`` tensor
    along dim 0, None the whole tensor. One table for the in-memory mapping and the streaming export."""
    out: dict[str, tuple[str, int | None]] = {"model.embed_tokens.weight": ("transformer.wte.weight", None)}
    for i in range(num_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = (src + "attn.c_attn.weight", part)
            out[dst + f"self_attn.{name}.bias"] = (src + "attn.c_attn.bias", part)
        out[dst + "self_attn.o_proj.weight"] = (src + "attn.c_proj.weight", None)
        out[dst + "mlp.gate_proj.weight"] = (src + "mlp.w2.weight", None)  # w2 is the gate, w1 the up projection
        out[dst + "mlp.up_proj.weight"] = (src + "mlp.w1.weight", None)
        out[dst + "mlp.down_proj.weight"] = (src + "mlp.c_proj.weight", None)
        out[dst + "input_layernorm.weight"] = (src + "ln_1.weight", None)
        out[dst + "post_attention_layernorm.weight"] = (src + "ln_2.weight", None)
    out["model.norm.weight"] = ("transformer.ln_f.weight", None)
    out["lm_head.weight"] = ("lm_head.weight", None)
    return out


def qwen2_tensor(get: Callable[[str], torch.Tensor], source_key: str, part: int | None) -> torch.Tensor:
    """One Qwen2 tensor from the Qwen v1 tensor ``get(source_key)`` (a view where no split is needed)."""
    tensor = get(source_key)
    return tensor if part is None else tensor.chunk(3, dim=0)[part]


def qwen2_state_dict(model: QWenLMHeadModel) -> dict[str, torch.Tensor]:
    """Qwen2 key -> tensor, sharing storage with ``model``."""
    sd = model.state_dict()
    return {key: qwen2_tensor(sd.__getitem__, src, part)
            for key, (src, part) in qwen2_key_map(model.config.num_hidden_layers).items()}


def to_qwen2(
    model: QWenLMHeadModel,
    attn_implementation: str = "sdpa",
    rope_parameters: dict | None = None,
    max_position_embeddings: int | None = None,
) -> Qwen2ForCausalLM:
    """A ``Qwen2ForCausalLM`` with ``model``'s weights, dtype and device (rotary options as in :func:`qwen2_config`)."""
    config = qwen2_config(model, attn_implementation, rope_parameters, max_position_embeddings)
    with torch.device("meta"):  # no time spent on a random init of weights we replace
        qwen2 = Qwen2ForCausalLM(config)
    qwen2.load_state_dict(qwen2_state_dict(model), assign=True, strict=True)
    qwen2.model.rotary_emb = Qwen2RotaryEmbedding(config).to(model.device)  # its buffers, off meta
    return qwen2.to(dtype=model.dtype).eval()
