"""Map a Qwen v1 model onto transformers' ``Qwen2ForCausalLM`` (same math, other weight names).

Qwen2's architecture is Qwen v1's without dynamic NTK and logn, with q/k/v split out of the fused
``c_attn``. Below ``seq_length`` the two compute the same function, which makes Qwen2 an
independent reference for tests and benchmarks, and a way to hand a Qwen v1 checkpoint to tools
that know Qwen2 but not Qwen v1.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from .modeling import QWenLMHeadModel


def qwen2_config(model: QWenLMHeadModel, attn_implementation: str = "sdpa") -> Qwen2Config:
    c = model.config
    windows = c.layer_windows()
    sizes = set(windows) - {None}
    if len(sizes) > 1:
        raise ValueError(f"Qwen2 has one sliding window size; this model uses several: {sorted(sizes)}")
    sliding = dict(
        use_sliding_window=True,
        sliding_window=sizes.pop(),
        layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
    ) if sizes else {}
    return Qwen2Config(
        **sliding,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size // 2,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        max_position_embeddings=c.seq_length,
        rms_norm_eps=c.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rotary_emb_base)},
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )


def qwen2_state_dict(model: QWenLMHeadModel) -> dict[str, torch.Tensor]:
    """Qwen2 key -> tensor, sharing storage with ``model`` where no split is needed."""
    sd = model.state_dict()
    h = model.config.hidden_size
    out = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "model.norm.weight": sd["transformer.ln_f.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for part, (w, b) in zip(
            ("q_proj", "k_proj", "v_proj"),
            zip(sd[src + "attn.c_attn.weight"].split(h), sd[src + "attn.c_attn.bias"].split(h), strict=True),
            strict=True,
        ):
            out[dst + f"self_attn.{part}.weight"] = w
            out[dst + f"self_attn.{part}.bias"] = b
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attn.c_proj.weight"]
        out[dst + "mlp.gate_proj.weight"] = sd[src + "mlp.w2.weight"]
        out[dst + "mlp.up_proj.weight"] = sd[src + "mlp.w1.weight"]
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.c_proj.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ln_2.weight"]
    return out


def to_qwen2(model: QWenLMHeadModel, attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    """A ``Qwen2ForCausalLM`` with ``model``'s weights, dtype and device."""
    config = qwen2_config(model, attn_implementation)
    with torch.device("meta"):  # no time spent on a random init of weights we replace
        qwen2 = Qwen2ForCausalLM(config)
    qwen2.load_state_dict(qwen2_state_dict(model), assign=True, strict=True)
    qwen2.model.rotary_emb = Qwen2RotaryEmbedding(config).to(model.device)  # its buffers, off meta
    return qwen2.to(dtype=model.dtype).eval()
