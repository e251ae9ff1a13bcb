"""Multiple choice on next-token logits, and the original scripts' aggregation rules.

The original base scripts run one prompt (or a left-padded batch) per forward pass, take the
logits of the last position over the whole vocabulary, softmax them, gather the four letters'
probabilities and softmax those again. The prediction is the argmax, which is the argmax of the
four raw logits; the doubly-softmaxed values are what their result CSVs store as prob_A..prob_D.

Here prompts are ordered by their tokens, so that a batch holds prompts with the same few-shot examples
(one subject's), and a batch shares each forward pass: the prefix all its prompts have in common (the
examples) is computed once and its keys and values serve every row, then the rows' own tokens follow,
right-padded (pad id ``<|extra_0|>``, never attended). Only each row's last position goes through the
vocabulary projection. A batch that shares less than ``SHARED_MIN`` tokens, whose prompts pass the
model's ``seq_length`` (where dynamic NTK and logn depend on the whole length), or of a model with the int8
KV cache runs as one left-padded forward instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from statistics import mean

import torch

from .prompts import LETTERS

SHARED_MIN = 64  # tokens a batch must share before its prefix is computed apart


def letter_ids(tokenizer, spaced: bool) -> list[int]:
    """Token ids of "A".."D" (C-Eval, CMMLU) or " A".." D" (MMLU): each must be a single token."""
    ids = []
    for letter in LETTERS:
        encoded = tokenizer.encode((" " if spaced else "") + letter)
        if len(encoded) != 1:
            raise ValueError(f"{letter!r} is not a single token for this tokenizer: {encoded}")
        ids.append(encoded[0])
    return ids


def batches_by_prefix(prompts: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches in the order of their tokens, so prompts that start alike (one subject's
    few-shot examples) share a batch."""
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many tokens every prompt starts with, at most all but each one's last."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for n in range(limit):
        if any(p[n] != first[n] for p in prompts):
            return n
    return max(limit, 0)


@torch.inference_mode()
def choice_probs(model, prompts: Sequence[Sequence[int]], choices: Sequence[int], pad_id: int,
                 share_prefix: bool = True) -> torch.Tensor:
    """[len(prompts), len(choices)] probabilities, as the original stores them: the softmax over the
    choices of their softmax probabilities over the whole vocabulary at the last position.
    ``share_prefix=False`` runs every batch as one left-padded forward (``--prefix-cache-gb 0``)."""
    shared = shared_prefix(prompts) if share_prefix else 0
    # Past seq_length dynamic NTK and logn depend on the whole length; int8 keys take scales per forward.
    plain_keys = max(len(p) for p in prompts) <= model.config.seq_length and not model.config.use_cache_quantization
    if shared >= SHARED_MIN and plain_keys:
        cache = model.transformer(input_ids=torch.tensor([list(prompts[0][:shared])], device=model.device),
                                  use_cache=True).cache
        cache.batch_repeat_interleave(len(prompts))
        rest = [list(p[shared:]) for p in prompts]
        width = max(len(r) for r in rest)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rest], device=model.device)
        mask = torch.tensor([[1] * (shared + len(r)) + [0] * (width - len(r)) for r in rest], device=model.device)
        hidden = model.transformer(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
        last = torch.tensor([len(r) - 1 for r in rest], device=model.device)
        logits = model.lm_head(hidden[torch.arange(len(rest), device=model.device), last]).float()
    else:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False).logits[:, -1].float()
    probs = torch.softmax(logits, dim=-1)[:, list(choices)]
    return torch.softmax(probs, dim=-1).cpu()


def score_choices(
    model,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[int],
    pad_id: int,
    batch_size: int,
    on_batch: Callable[[list[int], torch.Tensor], None],
    share_prefix: bool = True,
) -> None:
    """Score every prompt, calling ``on_batch(indices, probs)`` after each forward pass (so results
    can be written, and an interrupted run resumed, batch by batch)."""
    for batch in batches_by_prefix(prompts, batch_size):
        on_batch(batch, choice_probs(model, [prompts[i] for i in batch], choices, pad_id, share_prefix))


def argmax_letter(probs: Sequence[float]) -> str:
    best = max(range(len(probs)), key=lambda i: (probs[i], -i))  # the first of equal values, as np.argmax
    return LETTERS[best]


# ----- aggregation -------------------------------------------------------------------------------------


def macro_average(correct: dict[str, list[bool]], categories: dict[str, Sequence[str]]) -> dict[str, float]:
    """C-Eval and CMMLU: each subject's accuracy (%), then unweighted means over the subjects of each
    category and of all subjects ("Average"). Categories with no evaluated subject are left out."""
    acc = {s: 100 * mean(c) for s, c in correct.items() if c}
    result = {name: mean(acc[s] for s in subjects if s in acc) for name, subjects in categories.items()
              if any(s in acc for s in subjects)}
    if acc:
        result["Average"] = mean(acc.values())
    return result


def micro_average(correct: dict[str, list[bool]], categories: dict[str, Sequence[str]]) -> dict[str, float]:
    """MMLU: accuracy (%) over all questions of each category and of all subjects ("Average")."""
    def pooled(subjects: Sequence[str]) -> list[bool]:
        return [c for s in subjects for c in correct.get(s, [])]

    result = {name: 100 * mean(pooled(subjects)) for name, subjects in categories.items() if pooled(subjects)}
    everything = pooled(list(correct))
    if everything:
        result["Average"] = 100 * mean(everything)
    return result
