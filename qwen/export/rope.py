"""Long context in a Qwen2 export: which of transformers' rotary scalings stands in for Qwen v1's NTK + logn.

Qwen v1 reaches past its training context (``seq_length``) with two inference-time tricks Qwen2 lacks:
dynamic NTK (a larger rotary base, chosen once from the prompt length) and logn (queries past
``seq_length`` scaled by log(p+1) / log(seq_length)). Below ``seq_length`` neither is active, so a plain
Qwen2 export is exact there. Past it, a Qwen2 config can only ask for one of transformers'
``rope_parameters``:

* ``none``: the plain rotary; attention degrades past ``seq_length`` as in any unscaled model.
* ``dynamic``: transformers' dynamic NTK. With factor 2 its base is Qwen's at 2x, 4x, 8x ``seq_length``
  (alpha 3, 7, 15) and is only rescaled past ``seq_length``; logn is still missing. vLLM reads it as a
  fixed NTK base for every length (max length ``seq_length * factor``), which is not exact below
  ``seq_length``.
* ``yarn``: YaRN with ``factor`` over ``seq_length``; it changes the rotary at every length (so it is
  not exact below ``seq_length`` either) and scales attention temperature, in the spirit of logn.

:func:`measure_drift` compares each choice's logits with ours on long prompts of a (tiny) model, which
is how ``DEFAULT_ROPE_SCALING`` was chosen: ``python -m qwen.export.rope`` prints the table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from ..convert import to_qwen2
from ..modeling import QWenLMHeadModel

ROPE_SCALINGS = ("none", "dynamic", "yarn")
# For models that use dynamic NTK (all but 72B): the choice whose logits drift least from ours past seq_length
# (see measure_drift and the table in docs/export.md).
DEFAULT_ROPE_SCALING = "dynamic"
DEFAULT_FACTORS = {"dynamic": 2.0, "yarn": 4.0}


def default_rope_scaling(use_dynamic_ntk: bool) -> str:
    """``DEFAULT_ROPE_SCALING`` for a model with dynamic NTK; ``none`` for one without (Qwen-72B): its base never
    changes, so the plain rotary is exact at every length (only logn, if on, is missing past ``seq_length``)."""
    return DEFAULT_ROPE_SCALING if use_dynamic_ntk else "none"


@dataclass(frozen=True)
class RopeScaling:
    """A Qwen2 rotary setting: ``rope_parameters`` (without ``rope_theta``) and the context it declares."""

    name: str
    rope_parameters: dict
    max_position_embeddings: int

    def describe(self, seq_length: int, use_dynamic_ntk: bool = True, use_logn_attn: bool = True) -> str:
        """One line for the export report: what the choice means for exactness."""
        if self.name == "none":
            if not (use_dynamic_ntk or use_logn_attn):
                return "rope scaling: none (the model uses neither dynamic NTK nor logn: exact at every length)"
            return f"rope scaling: none (exact below {seq_length} tokens; past it, plain rotary without NTK/logn)"
        factor = self.rope_parameters["factor"]
        if self.name == "dynamic":
            return (f"rope scaling: dynamic NTK, factor {factor:g} (exact below {seq_length} tokens in transformers; "
                    f"past it the NTK base follows Qwen's at 2x/4x/8x, without logn). vLLM and SGLang read it as "
                    f"one fixed NTK base at every length, not exact below {seq_length} tokens: for them export with "
                    "--rope-scaling none")
        return (f"rope scaling: yarn, factor {factor:g} over {seq_length} tokens (approximate at every length; "
                f"declares {self.max_position_embeddings} tokens)")


def rope_scaling(name: str, seq_length: int, factor: float | None = None) -> RopeScaling:
    """The Qwen2 rotary setting for ``--rope-scaling NAME [--rope-factor F]``."""
    if name not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling must be one of {', '.join(ROPE_SCALINGS)}, not {name!r}")
    if name == "none":
        if factor is not None:
            raise ValueError("--rope-factor needs --rope-scaling dynamic or yarn")
        return RopeScaling(name, {"rope_type": "default"}, seq_length)
    factor = DEFAULT_FACTORS[name] if factor is None else float(factor)
    if factor <= 1:
        raise ValueError(f"the rope factor must be above 1, not {factor:g}")
    if name == "dynamic":
        # transformers rescales only once the sequence passes max_position_embeddings: it must stay seq_length.
        return RopeScaling(name, {"rope_type": "dynamic", "factor": factor}, seq_length)
    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": seq_length}
    return RopeScaling(name, params, int(seq_length * factor))


@dataclass(frozen=True)
class Drift:
    """How far one choice's logits are from ours on one prompt: largest and mean absolute difference over
    every position, and the share of positions whose top token agrees."""

    max_abs: float
    mean_abs: float
    top1: float


@torch.no_grad()
def measure_drift(
    model: QWenLMHeadModel, multiples: tuple[float, ...] = (0.5, 1.5, 2.0, 3.0, 4.0), seed: int = 0
) -> dict[str, dict[float, Drift]]:
    """Logit drift of each Qwen2 rotary choice from ``model`` (fp32, with its dynamic NTK and logn) on random
    prompts of ``multiples`` x ``seq_length`` tokens, one forward pass each (a prefill, where Qwen fixes
    its NTK alpha). Returns ``{choice: {multiple: Drift}}``."""
    seq_length = model.config.seq_length
    gen = torch.Generator().manual_seed(seed)
    prompts = {m: torch.randint(0, 151643, (1, max(1, int(m * seq_length))), generator=gen) for m in multiples}
    ours = {m: model(ids).logits.float() for m, ids in prompts.items()}
    table: dict[str, dict[float, Drift]] = {}
    for name in ROPE_SCALINGS:
        scaling = rope_scaling(name, seq_length)
        qwen2 = to_qwen2(model, "eager", scaling.rope_parameters, scaling.max_position_embeddings)
        table[name] = {}
        for m, ids in prompts.items():
            theirs = qwen2(ids).logits.float()
            diff = (theirs - ours[m]).abs()
            agree = (theirs.argmax(-1) == ours[m].argmax(-1)).float().mean()
            table[name][m] = Drift(diff.max().item(), diff.mean().item(), agree.item())
    return table


def least_drift(table: dict[str, dict[float, Drift]], seq_length_multiple: float = 1.0) -> str:
    """The choice with the smallest mean drift over the prompts longer than ``seq_length``."""
    def past(name: str) -> float:
        rows = [d.mean_abs for m, d in table[name].items() if m > seq_length_multiple]
        return sum(rows) / len(rows)

    return min(table, key=past)


def format_table(table: dict[str, dict[float, Drift]], seq_length: int) -> str:
    """The drift table as Markdown (docs/export.md's)."""
    multiples = sorted(next(iter(table.values())))
    head = "| prompt length | " + " | ".join(f"`{n}` max / mean abs, top-1" for n in table) + " |"
    lines = [head, "|" + " --- |" * (len(table) + 1)]
    for m in multiples:
        cells = [f"{d.max_abs:.3g} / {d.mean_abs:.3g}, {d.top1:.0%}" for d in (table[n][m] for n in table)]
        lines.append(f"| {m:g} x {seq_length} = {int(m * seq_length)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tiny_long_context_shape(seq_length: int) -> dict:
    """make_tiny_checkpoint arguments for a tiny model whose attention depends on position: the default tiny
    weights (std 0.02) give near-uniform attention, where every rotary choice looks alike. Two heads of 64
    (real Qwen heads have 128 dims) and std 0.1 make the rotary matter."""
    return dict(seq_length=seq_length, layers=2, hidden=128, heads=2, intermediate=256, initializer_range=0.1)


def main(argv: list[str] | None = None) -> None:
    """Measure the drift table on a tiny random model (or a checkpoint folder) and name the least-drift choice."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from ..tiny import make_tiny_checkpoint

    parser = argparse.ArgumentParser(prog="python -m qwen.export.rope", description=main.__doc__)
    parser.add_argument("folder", nargs="?", help="a Qwen checkpoint folder (default: a tiny random one)")
    parser.add_argument("--seq-length", type=int, default=64, help="seq_length of the tiny model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temp:
        folder = args.folder or make_tiny_checkpoint(temp, seed=args.seed, **tiny_long_context_shape(args.seq_length))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        table = measure_drift(model, seed=args.seed)
    print(format_table(table, model.config.seq_length))
    print(f"least drift past seq_length: {least_drift(table)}")


if __name__ == "__main__":
    main()
