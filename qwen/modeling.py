"""The Qwen v1 model: the whole forward pass in one file.

Module and weight names are those of the original checkpoints (``transformer.h.{i}.attn.c_attn``
...), so original folders, peft target names and GPTQ layouts work unchanged. The math follows the
original remote code; where it behaves oddly (QUIRK) the default path matches it, so outputs agree
token for token.

Positions: rotary and logn use ``position_ids`` when given (``generate`` derives them from the
attention mask), else ``0..kv_len-1`` like the original. Rotary is relative, so the two agree
everywhere except for left-padded rows beyond ``seq_length``, where ours treats each row as if it
were alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from . import chat as chat_utils
from .config import QWenConfig, default_dtype
from .kv_cache import Int8KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back to the input dtype, THEN scale (the original's order).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


# ----- positions: rotary, dynamic NTK, logn -------------------------------------------------------


def ntk_alpha(lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Dynamic-NTK alpha per row: max(2^ceil(log2(L / seq_length) + 1) - 1, 1) for prompt length L.

    That is 1 up to seq_length, 3 up to 2x, 7 up to 4x, 15 up to 8x.
    """
    ctx = torch.log2(lengths.double() / seq_length) + 1
    return torch.clamp(2 ** torch.ceil(ctx) - 1, min=1)


def rotary_cos_sin(
    positions: torch.Tensor, alpha: torch.Tensor, head_dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, head_dim] (fp32) for positions [B, T] and per-row NTK alpha [B].

    The effective base is ``base * alpha^(d / (d - 2))``; the rotary covers the whole head
    (rotary_pct 1.0) in the rotate-half (NeoX) layout.
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    bases = (base * alpha.double() ** (head_dim / (head_dim - 2))).float().to(positions.device)
    inv_freq = 1.0 / (bases[:, None] ** exponent)  # [B, D/2]
    freqs = positions.float()[:, :, None] * inv_freq[:, None, :]  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, heads, T, D] in fp32 and cast back, as the original does."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """LogN query scale [B, 1, T, 1]: log(p+1)/log(seq_length) beyond seq_length, else 1."""
    scale = torch.log(positions.double() + 1) / math.log(seq_length)
    return torch.clamp(scale, min=1).float()[:, None, :, None]


# ----- attention ----------------------------------------------------------------------------------


def build_attention_mask(
    key_valid: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, q_len, kv_len] (True = may attend), or None for plain causal attention.

    None is returned when the whole cache is valid and either one token is decoded or a prefill
    starts from an empty cache: then the attention kernel's own causal flag is exact.
    """
    kv_len = past_len + q_len
    if key_valid is None or bool(key_valid.all()):
        if q_len == 1 or past_len == 0:
            return None
        key_valid = torch.ones(1, kv_len, dtype=torch.bool, device=device)
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    causal = torch.arange(kv_len, device=device)[None, :] <= q_pos  # [q_len, kv_len]
    allowed = causal[None, None] & key_valid[:, None, None, :].bool()
    # A left-padding query sees no key at all; let it see every key (its output is never used)
    # rather than produce NaN that the softmax would spread.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def window_mask(
    base: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int
) -> torch.Tensor:
    """Restrict a boolean mask [B|1, 1, q, kv] so a query at position p sees keys in (p - window, p]."""
    near = k_pos[:, None, None, :] > q_pos[:, None, :, None] - window
    allowed = base & near
    return allowed | ~allowed.any(dim=-1, keepdim=True)


@dataclass(frozen=True)
class Window:
    """A sliding window for a kernel that applies it itself (flash-attn's ``window_size``, a
    FlexAttention block mask) instead of a dense mask: a query at position p sees keys at positions
    (p - size, p]. ``q_pos`` [B, q], ``k_pos`` [B, kv], ``key_valid`` [B, kv] or None (all keys real)."""

    size: int
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    key_valid: torch.Tensor | None

    def mask_mod(self):
        """The window as FlexAttention's mask function (a plain function of its four indices)."""
        size, q_pos, k_pos, key_valid = self.size, self.q_pos, self.k_pos, self.key_valid

        def allows(b, h, q_idx, kv_idx):
            q, k = q_pos[b, q_idx], k_pos[b, kv_idx]
            ok = (k <= q) & (k > q - size)
            return ok & key_valid[b, kv_idx] if key_valid is not None else ok

        return allows


def window_by_kernel(implementation: str, device: torch.device, q_len: int) -> bool:
    """Whether windowed layers hand their window to the attention kernel rather than a dense mask (which
    computes every masked-out score too): for a prefill (a decode's one query costs the same either
    way) with ``attn_implementation="flex_attention"``, or on CUDA where flash-attn is installed.
    FlexAttention compiles a kernel on first use, so plain SDPA stays the default until
    bench/gpu_profile.py's window rows have been measured on a GPU."""
    if q_len == 1 or implementation == "eager":
        return False
    return implementation == "flex_attention" or (device.type == "cuda" and _flash_attn_func() is not None)


def layer_window_masks(
    windows: list[int | None],
    mask: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    q_pos: torch.Tensor,
    past_len: int,
    kv_len: int,
    by_kernel: bool = False,
) -> dict[int | None, tuple[torch.Tensor | None, Window | None]]:
    """The (mask, kernel window) of each distinct window (None: full attention keeps ``mask``).
    With ``by_kernel`` a windowed layer keeps ``mask`` and gets a ``Window`` for its kernel; else a
    dense mask with the window applied."""
    masks: dict[int | None, tuple[torch.Tensor | None, Window | None]] = {None: (mask, None)}
    if not any(windows):
        return masks
    device = q_pos.device
    k_pos = key_valid.long().cumsum(-1) - 1 if key_valid is not None else torch.arange(kv_len, device=device)[None]
    if by_kernel:
        valid = key_valid.bool() if key_valid is not None else None
        for w in set(windows) - {None}:
            masks[w] = (mask, Window(w, q_pos, k_pos.expand(q_pos.shape[0], -1), valid))
        return masks
    if mask is None:  # plain causal over the cache
        causal = torch.arange(kv_len, device=device) <= torch.arange(past_len, kv_len, device=device)[:, None]
        mask = causal[None, None]
    for w in set(windows) - {None}:
        masks[w] = (window_mask(mask, q_pos, k_pos, w), None)
    return masks


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window) -> torch.Tensor:
    """Attention over [B, heads, T, D] under ``window`` with FlexAttention, which skips the blocks the
    window masks out entirely: a long prompt costs O(T x window) rather than O(T^2). Compiled on
    CUDA (its fast kernel); on the CPU its reference implementation (what tests check it with)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(window.mask_mod(), q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    flex = _compiled_flex_attention() if q.is_cuda else flex_attention
    return flex(q, k, v, block_mask=block_mask)


@functools.cache
def _flash_attn_func():
    """flash-attn's kernel when it is installed (CUDA builds only), else None."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    implementation: str,
    dropout: float = 0.0,
    softmax_in_fp32: bool = False,
    window: Window | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over [B, heads, T, D]; the one attention function of the package.

    ``implementation`` is transformers' name: "eager", "sdpa" (default), "flash_attention_2" or
    "flex_attention". flash-attn is used for fp16/bf16 CUDA tensors without padding whenever it is
    importable and the implementation is not "eager"; everything else runs PyTorch SDPA. A
    ``window`` (see ``window_by_kernel``) goes to flash-attn's ``window_size`` where flash-attn
    runs, else to FlexAttention; ``mask`` then holds only the padding.
    """
    causal = mask is None and q.shape[2] > 1
    if implementation == "eager":
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is None and causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float() if softmax_in_fp32 else scores, dim=-1).type_as(q)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        return torch.matmul(probs, v)
    # A compiled graph (the engine's decode step) keeps to SDPA, which torch.compile traces.
    half_cuda = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not torch.compiler.is_compiling()
    flash = _flash_attn_func() if half_cuda and implementation != "flex_attention" else None
    if flash is not None and mask is None:
        return flash_attention(flash, q, k, v, dropout, causal, window.size if window is not None else None)
    if window is not None:
        return flex_window_attention(q, k, v, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def flash_attention(flash, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, causal: bool,
                    window: int | None) -> torch.Tensor:
    """flash-attn's ``flash_attn_func`` on [B, heads, T, D] tensors (it takes [B, T, heads, D]). It
    aligns the causal diagonal bottom-right, which is right for a KV cache; a window of w keys is its
    ``window_size=(w - 1, 0)``: the query's own key and the w - 1 before it."""
    extra = {"window_size": (window - 1, 0)} if window is not None else {}
    out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout,
                causal=causal or window is not None, **extra)
    return out.transpose(1, 2)


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: Cache | None,
        window: Window | None = None,
    ) -> torch.Tensor:
        bsz, q_len, hidden = x.shape
        q, k, v = (
            t.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
            for t in self.c_attn(x).split(hidden, dim=-1)
        )
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if logn is not None:
            q = q * logn.type_as(q)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            if hasattr(cache, "layer_mask"):  # the engine's cache may lay out a layer's keys its own way
                mask = cache.layer_mask(self.layer_idx, mask)
        out = attend(
            q,
            k,
            v,
            mask,
            implementation=self.config._attn_implementation or "sdpa",
            dropout=self.config.attn_dropout_prob if self.training else 0.0,
            softmax_in_fp32=self.config.softmax_in_fp32,
            window=window,
        )
        return self.c_proj(out.transpose(1, 2).reshape(bsz, q_len, hidden))


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        half = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, half, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, half, bias=not config.no_bias)
        self.c_proj = nn.Linear(half, config.hidden_size, bias=not config.no_bias)
        self.w12: nn.Linear | None = None  # w1 and w2 stacked, after fuse_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # w2 is the gate, w1 the up projection.
        up, gate = self.w12(x).chunk(2, dim=-1) if self.w12 is not None else (self.w1(x), self.w2(x))
        return self.c_proj(up * F.silu(gate))

    def fuse_(self) -> None:
        """Replace w1 and w2 by one Linear of both weights: one matmul (one kernel, one pass over the
        input) instead of two. For inference: the module's weight names no longer match a checkpoint's."""
        if self.w12 is not None:
            return
        w1, w2 = self.w1, self.w2
        fused = nn.Linear(w1.in_features, w1.out_features + w2.out_features, bias=w1.bias is not None,
                          device=w1.weight.device, dtype=w1.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([w1.weight, w2.weight]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([w1.bias, w2.bias]))
        fused.requires_grad_(w1.weight.requires_grad)
        del self.w1, self.w2
        self.w12 = fused


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        h: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        window: Window | None = None,
    ) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), rotary, logn, mask, cache, window)
        return h + self.mlp(self.ln_2(h))


# ----- models -------------------------------------------------------------------------------------


class QWenPreTrainedModel(PreTrainedModel):
    config: QWenConfig
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any layer recomputes activations in the backward pass. transformers 5.25 deprecated this
        name with a FutureWarning on every read, and peft (0.21) reads it whenever it wraps a model, so
        every LoRA fine-tune printed it; the same answer, computed here, says nothing."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader plus Qwen's rules: the original bf16/fp16/fp32 flags choose the dtype
        when none is given (else bf16/fp16 on CUDA, fp32 on CPU, as the original did), a folder of
        another architecture is refused, and missing weights are an error rather than random init."""
        config = kwargs.get("config")
        if not isinstance(config, QWenConfig):
            # Config fields given as arguments (bf16=True, use_cache_quantization=True, ...) override config.json.
            overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in QWenConfig.__annotations__}
            config = QWenConfig.from_pretrained(pretrained_model_name_or_path, **overrides)
            kwargs["config"] = config
        # GPTQ (-Int4/-Int8) folders load in plain PyTorch, see qwen/quantization/gptq_load.py
        from .quantization.gptq_load import load_if_gptq

        if (gptq_model := load_if_gptq(cls, pretrained_model_name_or_path, kwargs)) is not None:
            _use_cpu_kernels(gptq_model[0] if isinstance(gptq_model, tuple) else gptq_model)
            return gptq_model
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = config.flag_dtype() or default_dtype()
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{pretrained_model_name_or_path} lacks {len(missing)} weights of this Qwen config "
                f"(e.g. {missing[:3]}): the checkpoint is incomplete or belongs to another model size; "
                f"re-download the weight files or fix config.json."
            )
        if not (Path(str(pretrained_model_name_or_path)) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig(**chat_utils.CHAT_GENERATION_DEFAULTS)
        _use_cpu_kernels(model)
        return (model, info) if want_info else model


def _use_cpu_kernels(model: QWenPreTrainedModel) -> None:
    """bf16 decoding at the CPU's memory speed where it has AVX-512 BF16 (see qwen.cpu_kernels)."""
    if model.device.type == "cpu" and model.dtype == torch.bfloat16:
        from .cpu_kernels import use_cpu_kernels_

        use_cpu_kernels_(model)


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        ntk_alpha_override: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``attention_mask`` is [B, kv_len] (1 = real token) or a ready 4D mask; ``position_ids``
        [B, T]. ``ntk_alpha_override`` [B] lets a caller that manages its own cache (the engine)
        pass the alpha it fixed at each sequence's prefill."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        h = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, q_len = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = make_cache(self.config)
        if not use_cache:
            cache = None
        past_len = cache.get_seq_length() if cache is not None else 0
        kv_len = past_len + q_len

        key_valid = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            if key_valid is not None:
                position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, kv_len, device=h.device)[None].expand(bsz, -1)
        position_ids = position_ids.expand(bsz, -1)

        alpha = self._ntk_alpha(ntk_alpha_override, key_valid, cache, past_len, kv_len, bsz, h.device)
        rotary = rotary_cos_sin(position_ids, alpha, self.config.head_dim, self.config.rotary_emb_base)
        logn = None
        if self.config.use_logn_attn and not self.training and kv_len > self.config.seq_length:
            logn = logn_scale(position_ids, self.config.seq_length)
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
        else:
            mask = build_attention_mask(key_valid, q_len, past_len, h.device)

        windows = self.config.layer_windows()
        by_kernel = window_by_kernel(self.config._attn_implementation or "sdpa", h.device, q_len)
        layer_masks = layer_window_masks(windows, mask, key_valid, position_ids, past_len, kv_len, by_kernel)

        h = self.drop(h)
        for block, window in zip(self.h, windows, strict=True):
            layer_mask, kernel_window = layer_masks[window]
            h = block(h, rotary, logn, layer_mask, cache, kernel_window)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(h), cache=cache)

    def _ntk_alpha(self, override, key_valid, cache, past_len, kv_len, bsz, device) -> torch.Tensor:
        """Alpha is chosen once at prefill from each row's real length, then reused for every
        decode step (QUIRK of the original, kept: outputs must match it token for token)."""
        if override is not None:
            return override
        if self.training or not self.config.use_dynamic_ntk:
            return torch.ones(bsz, dtype=torch.float64, device=device)
        if past_len > 0 and getattr(cache, "qwen_ntk_alpha", None) is not None:
            return cache.qwen_ntk_alpha
        lengths = key_valid.sum(-1) if key_valid is not None else torch.full((bsz,), kv_len, device=device)
        alpha = ntk_alpha(lengths, self.config.seq_length)
        if cache is not None:
            cache.qwen_ntk_alpha = alpha
        return alpha


def make_cache(config: QWenConfig) -> Cache:
    """The cache a Qwen config asks for: int8 when use_cache_quantization, else transformers' dynamic cache."""
    if config.use_cache_quantization:
        return Int8KVCache(config.num_hidden_layers)
    return DynamicCache(config=config)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.loss_type = "ForCausalLM"  # transformers guesses it from the class name, which does not say
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def fuse_weights_(self) -> QWenLMHeadModel:
        """Fuse each MLP's w1 and w2 into one matmul (see ``QWenMLP.fuse_``), in place, for inference:
        a decode step then launches one kernel and reads one weight less per layer. Do it before
        ``quantize_int8_``/``quantize_int4_``; a fused model cannot be saved as an original checkpoint."""
        for block in self.transformer.h:
            if not isinstance(block.mlp.w1, nn.Linear) or not isinstance(block.mlp.w2, nn.Linear):
                raise ValueError("fuse the weights before quantizing them (w1/w2 are no longer nn.Linear)")
            block.mlp.fuse_()
        return self

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else kwargs.pop("past_key_values", None),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            ntk_alpha_override=kwargs.pop("ntk_alpha_override", None),
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() builds a DynamicCache by default; Qwen's int8 option needs its own cache.
        if self.config.use_cache_quantization and model_kwargs.get("cache") is None and generation_config.use_cache:
            model_kwargs["cache"] = Int8KVCache(self.config.num_hidden_layers)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _prepare_generation_config(
        self, generation_config: GenerationConfig | None, **kwargs
    ) -> tuple[GenerationConfig, dict]:
        """Let a length limit asked for in the call win over the folder's ``max_new_tokens``.

        transformers fills every unset field from ``model.generation_config`` (the original folders set
        ``max_new_tokens: 512``) and then lets ``max_new_tokens`` win over ``max_length`` when both are
        set, so ``generate(max_length=n)`` (as lm-eval calls it) would run 512 new tokens. The limit the
        caller gave (in kwargs, else in the ``generation_config`` passed) is the one that counts.
        """
        config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        asked = kwargs if any(kwargs.get(k) is not None for k in ("max_length", "max_new_tokens")) else {}
        if not asked and generation_config is not None:
            asked = {"max_length": generation_config.max_length, "max_new_tokens": generation_config.max_new_tokens}
        if asked.get("max_length") is not None and asked.get("max_new_tokens") is None:
            config.max_new_tokens = None
        return config, model_kwargs

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 stopping_criteria=None, stop_words_ids=None, **kwargs):
        """transformers' ``generate`` plus the original's ``stop_words_ids`` (token id sequences; default:
        the generation config's): a row ends once its new tokens end with one of them, which stay in the
        output as the original's did."""
        config = generation_config or self.generation_config
        stop_words_ids = stop_words_ids if stop_words_ids is not None else getattr(config, "stop_words_ids", None)
        if stop_words_ids:
            prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            stop_ids, _ = chat_utils.normalize_stop_words(stop_words_ids)
            criteria = chat_utils.StopWordsCriteria(None, prompt.shape[1], stop_ids, [])
            stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), criteria])
        return super().generate(inputs, generation_config=generation_config, stopping_criteria=stopping_criteria,
                                **kwargs)

    def chat(self, tokenizer, query: str, history=None, system: str = chat_utils.DEFAULT_SYSTEM,
             stop_words_ids=None, generation_config=None, **kwargs):
        """One chat turn, as the original ``model.chat``: returns ``(response, new_history)``."""
        return chat_utils.chat(self, tokenizer, query, history, system, stop_words_ids, generation_config, **kwargs)

    def chat_stream(self, tokenizer, query: str, history=None, system: str = chat_utils.DEFAULT_SYSTEM,
                    stop_words_ids=None, generation_config=None, **kwargs):
        """Yield the growing response text of one chat turn, as the original ``model.chat_stream``."""
        return chat_utils.chat_stream(
            self, tokenizer, query, history, system, stop_words_ids, generation_config, **kwargs
        )
