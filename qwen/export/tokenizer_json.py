"""Qwen v1's tiktoken vocabulary as a fast tokenizer (``tokenizer.json``) that plain transformers, vLLM,
SGLang and TGI load without ``qwen`` or remote code.

The byte-level BPE is built by transformers' own tiktoken converter (``TikTokenConverter``): its
vocabulary maps each token's bytes through the GPT-2 byte-to-unicode table and its merges are every
split of a token into two tokens, ordered by the token's rank, which reproduces tiktoken's
rank-greedy merging. Around it this module sets what Qwen adds and the converter does not:

* Qwen's split pattern (single digits, ``\\p{N}``), which the converter takes as an argument;
* NFC normalisation of the input, as ``QWenTokenizer`` does before encoding;
* the 208 special tokens at their own ids (151643..; ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<|extra_0..204|>``), matched *after* normalisation (``normalized: true``) because Qwen normalises the
  whole text and then finds special tokens: ``"<|endoftext|>\\u0338"`` is NFC ``"<|endoftext|\\u226f"``,
  plain text, in both;
* any extra vocabulary (``qwen_extra.tiktoken``) at the ids it has in the source.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, normalizers
from transformers.convert_slow_tokenizer import TikTokenConverter

from ..tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, PAT_STR, QWenTokenizer

TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # loads tokenizer.json as it is, in transformers 4.x and 5


class _RanksConverter(TikTokenConverter):
    """transformers' tiktoken converter fed from ranks in memory (a folder's base plus extra vocabulary) instead
    of a ``.tiktoken`` path."""

    def __init__(self, ranks: dict[bytes, int]) -> None:
        super().__init__(vocab_file=None, pattern=PAT_STR)
        self.ranks = ranks

    def load_tiktoken_bpe(self, tiktoken_url: str | None) -> dict[bytes, int]:
        return self.ranks


_built: dict[int, Tokenizer] = {}  # vocabulary hash -> the last tokenizer built for it


def fast_tokenizer(tokenizer: QWenTokenizer) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` encoding and decoding exactly as ``tokenizer`` does.

    Building it takes seconds (the converter walks every split of 151k tokens), so the last one is kept for
    the next export of the same vocabulary in this process (e.g. a qwen2 and a GGUF export)."""
    key = hash((frozenset(tokenizer.mergeable_ranks.items()), frozenset(tokenizer.special_tokens.items())))
    if key not in _built:
        _built.clear()
        _built[key] = _build(tokenizer)
    return _built[key]


def _build(tokenizer: QWenTokenizer) -> Tokenizer:
    converted = _RanksConverter(tokenizer.mergeable_ranks).converted()
    converted.normalizer = normalizers.NFC()
    data = json.loads(converted.to_str())
    data["added_tokens"] = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
         "special": True}
        for token, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    ]
    return Tokenizer.from_str(json.dumps(data))


def bpe_merges(fast: Tokenizer) -> list[str]:
    """The merges of ``fast`` as ``"left right"`` strings (GGUF's ``tokenizer.ggml.merges``)."""
    merges = json.loads(fast.to_str())["model"]["merges"]
    return [" ".join(m) if isinstance(m, list) else m for m in merges]


def write_tokenizer_files(folder: Path, tokenizer: QWenTokenizer, fast: Tokenizer, *, chat: bool,
                          model_max_length: int) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json``: eos ``<|im_end|>`` for a chat model (its turns end
    there; ``generation_config.json`` adds the other stops), ``<|endoftext|>`` for a base model; pad
    ``<|endoftext|>``, as the original generation configs have it; the ChatML template of ``QWenTokenizer``."""
    fast.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": TOKENIZER_CLASS,
        "model_max_length": model_max_length,
        "eos_token": IM_END if chat else ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # Qwen decodes bytes as they are
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
