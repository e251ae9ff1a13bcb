"""Weight-only int8 quantization of Linear layers (``quantize="int8"`` / ``--int8``).

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth:
int8 weights move half the bytes of bf16. Each output channel gets one scale (symmetric,
round-to-nearest); PyTorch's ``_weight_int8pack_mm`` kernel multiplies without dequantizing the
whole matrix for a few rows; for many rows (a prefill) and off the CPU the layer dequantizes on the
fly and runs one matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# PyTorch's CPU int8 weight kernel is a matrix-vector loop: its time grows with every row, so past
# a few dozen rows (a prefill) dequantizing the weight and running one matmul is faster (measured
# on a 2048x5504 layer: 32 rows 5.7 vs 9.0 ms, 1024 rows 172 vs 27 ms).
INT8_KERNEL_MAX_ROWS = 32


class Int8Linear(nn.Module):
    """A Linear layer whose weight is stored as int8 with one scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        scales = self.scales.to(x.dtype)
        if x.device.type == "cpu" and flat.shape[0] <= INT8_KERNEL_MAX_ROWS:
            out = torch._weight_int8pack_mm(flat.contiguous(), self.weight, scales)
        else:
            out = F.linear(flat, self.weight.to(x.dtype) * scales[:, None])
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out


def quantize_int8_(model: nn.Module, include_lm_head: bool = True) -> nn.Module:
    """Replace the model's Linear layers by ``Int8Linear`` in place and return the model."""
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and (include_lm_head or name != "lm_head")
    ]
    for parent, name in targets:
        setattr(parent, name, Int8Linear(getattr(parent, name)))
    return model
