"""Log-probabilities of a prompt's own tokens, for ``/v1/completions`` with ``echo`` and ``logprobs``.

This is how lm-eval's ``local-completions`` backend scores multiple choice over HTTP: it sends the
context plus a continuation with ``echo=True, logprobs=k, max_tokens=0`` and sums the logprobs of
the continuation's tokens. Token i's logprob is log p(token i | tokens < i) under the model alone
(no penalties, no temperature); the first token has none (null), as OpenAI and vLLM answer.

The forward pass runs the transformer once and projects the hidden states onto the vocabulary a
block of positions at a time, so scoring a long prompt never holds [length, vocabulary] logits.
"""

from __future__ import annotations

import codecs
import threading

import torch

from ..lora import LoraAdapter, use_lora

BLOCK = 256  # positions projected onto the vocabulary at once
_lock = threading.Lock()  # one scoring pass at a time (the engine's thread runs beside it)


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], top: int,
                    adapter: LoraAdapter | None = None) -> list[tuple[float | None, list[tuple[int, float]]]]:
    """For each token of ``ids``: (its logprob or None for the first, the ``top`` most likely ids there
    with their logprobs, [] for the first), under ``model`` with the LoRA ``adapter`` if one."""
    with _lock, use_lora(adapter):
        hidden = model.transformer(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
        hidden = hidden.last_hidden_state[0, :-1]
        targets = torch.tensor(ids[1:], device=model.device)
        result: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
        for start in range(0, hidden.shape[0], BLOCK):
            logprobs = torch.log_softmax(model.lm_head(hidden[start:start + BLOCK]).float(), dim=-1)
            chosen = logprobs.gather(1, targets[start:start + BLOCK, None])[:, 0].tolist()
            if top:
                values, indices = logprobs.topk(top, dim=-1)
                alts = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
            else:
                alts = [[] for _ in chosen]
            result += list(zip(chosen, alts, strict=True))
    return result


def text_offsets(pieces: list[bytes], start: int = 0) -> list[int]:
    """Character offset where each token's text begins in the decoded text (UTF-8 decoded across token
    boundaries: a character split over two tokens counts at the token that completes it)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, position = [], start
    for piece in pieces:
        offsets.append(position)
        position += len(decoder.decode(piece))
    return offsets
