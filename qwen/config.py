"""QWenConfig: the fields and defaults of the original Qwen v1 configuration class."""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig


class QWenConfig(PreTrainedConfig):
    """Configuration of a Qwen v1 model (``model_type: "qwen"`` in an original config.json).

    Defaults are those of the original class (the 7B shape). ``seq_length`` is the training
    context (8192, 32768 for 72B); dynamic NTK and logn scaling start beyond it. The original
    ``bf16``/``fp16``/``fp32`` flags pick the load dtype when none is given (see ``flag_dtype``).
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    seq_length: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = "auto"
    no_bias: bool = True
    tie_word_embeddings: bool = False
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False
    softmax_in_fp32: bool = False
    # Window attention (the Qwen report's long-context option; not in the released code, so off):
    # one window for every layer, or one per layer; 0/None = full attention for that layer.
    use_window_attn: bool = False
    window_size: int | list[int | None] | None = None
    # transformers 5 no longer declares these on the base config; the original README passes pad_token_id.
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs) -> None:
        if sum(bool(f) for f in (self.bf16, self.fp16, self.fp32)) > 1:
            raise ValueError("At most one of bf16, fp16 and fp32 may be true in a Qwen config.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}."
            )
        per_layer = isinstance(self.window_size, list)
        if self.use_window_attn and per_layer and len(self.window_size) != self.num_hidden_layers:
            raise ValueError(
                f"window_size lists {len(self.window_size)} windows for {self.num_hidden_layers} layers; "
                "give one int for all layers or one entry per layer."
            )
        super().__post_init__(**kwargs)

    def layer_windows(self) -> list[int | None]:
        """The attention window of each layer (None = full attention)."""
        sizes = self.window_size if isinstance(self.window_size, list) else [self.window_size] * self.num_hidden_layers
        return [w or None for w in sizes] if self.use_window_attn else [None] * self.num_hidden_layers

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Refuse the config.json of another architecture instead of half-loading it."""
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(
                f"config.json says model_type {model_type!r}: this is not a Qwen v1 checkpoint (model_type "
                f"'qwen'). Load it with AutoModelForCausalLM or its own model class."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def flag_dtype(self) -> torch.dtype | None:
        """The dtype the original ``bf16``/``fp16``/``fp32`` flags ask for, or None if none is set."""
        for flag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
            if getattr(self, flag):
                return dtype
        return None


def window_schedule(num_layers: int, min_size: int, max_size: int) -> list[int]:
    """Per-layer windows as the Qwen report describes: short in the lowest layer, growing linearly
    to ``max_size`` in the highest."""
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    if num_layers == 1:
        return [max_size]
    return [round(min_size + (max_size - min_size) * i / (num_layers - 1)) for i in range(num_layers)]


def default_dtype() -> torch.dtype:
    """The original's automatic choice: bf16 where CUDA supports it, else fp16 on CUDA cc>=7, else fp32."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if torch.cuda.get_device_capability()[0] >= 7:
            return torch.float16
    return torch.float32
