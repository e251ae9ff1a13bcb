"""Grammar-constrained decoding: OpenAI ``response_format`` (JSON object / JSON schema), regexes, Lark.

Each step, a constrained row's logits are set to -inf for every token its grammar forbids, so whatever
the model and the sampling settings, the output is a prefix of a sentence of the grammar, and it ends
as soon as the grammar is complete. Rows without a grammar are not touched.

The grammar engine is llguidance, not xgrammar (both are maintained and run on CPU; measured on a
2-core CPU with Qwen's 151,936-token vocabulary and a five-field schema with a nested object):

- Install: llguidance is one 3 MB abi3 wheel (7.6 MB installed) with no dependencies. xgrammar needs
  torch, transformers, pydantic, numpy and apache-tvm-ffi, and on Linux x86-64 also triton (a 286 MB
  wheel, 1 GB installed) that only its GPU kernels use.
- Tokenizer: llguidance reads a tiktoken ``Encoding`` as it is (ranks, special tokens, ``n_vocab`` for
  the model's padded vocabulary, a list of end tokens); xgrammar needs a hand-built byte table.
- Speed: filling a mask costs about the same (median 0.02 ms a step for both; the first step of a
  request 2 ms with llguidance, 0.1 ms with xgrammar). A new grammar costs xgrammar 30-70 ms to
  compile; llguidance builds its lexer lazily (1-6 ms), and a cached matcher is copied in 16 us. The
  tokenizer is built once per engine (0.8 s for llguidance, 0.1 s for xgrammar). Both fill a
  batch's masks on a thread pool (llguidance's ``LLExecutor``, xgrammar's ``BatchGrammarMatcher``).
- Errors: llguidance refuses a schema keyword it cannot enforce (or, when asked, ignores it), so a
  "strict" schema is either enforced exactly or rejected up front.

JSON is generated in one line with ``json.dumps``' separators (``", "`` and ``": "``): free whitespace
lets a weak model loop on blanks and is worth nothing to a client.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import llguidance
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: Mapping[str, Any], strict: bool = True) -> str:
    """The grammar of the JSON documents valid under ``schema``. A keyword llguidance cannot enforce
    raises ValueError unless ``strict`` is False, in which case it is ignored (OpenAI's non-strict
    mode: best effort)."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"a JSON schema is an object, not {type(schema).__name__}")
    options = {**JSON_OPTIONS, "lenient": not strict}
    return _checked(llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=options))


def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """The grammar for an OpenAI ``response_format``: ``{"type": "json_object"}`` (any JSON object),
    ``{"type": "json_schema", "json_schema": {"schema": {...}, "strict": bool}}`` (``strict`` unset is
    strict: an unenforceable schema is refused rather than silently loosened), or None for
    ``{"type": "text"}`` / None."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        return json_schema_grammar(spec.get("schema") or {}, strict=spec.get("strict") is not False)
    raise ValueError(f"unknown response_format type {kind!r}; use text, json_object or json_schema")


def regex_grammar(pattern: str) -> str:
    """The grammar of the strings that match ``pattern`` in full (Rust ``regex`` syntax)."""
    return _checked(llguidance.LLMatcher.grammar_from_regex(pattern))


def lark_grammar(grammar: str) -> str:
    """A grammar in llguidance's Lark dialect (the start rule is ``start``)."""
    return _checked(llguidance.LLMatcher.grammar_from_lark(grammar))


def _checked(grammar: str) -> str:
    """``grammar``, once llguidance has compiled it (without a tokenizer: cheap); else ValueError."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ValueError(f"invalid grammar: {messages[0].strip()}")
    return grammar


class Grammars:
    """Matchers for one tokenizer and model vocabulary, and the step that applies them to logits.

    ``tokenizer`` is a ``QWenTokenizer`` (its tiktoken encoding is read as it is). Ids from the
    tokenizer's size up to ``vocab_size`` (the model's padding rows) have no bytes and are never
    allowed. ``<|endoftext|>`` and ``<|im_end|>`` are allowed exactly when the grammar is complete:
    they end a constrained sequence (``end_ids``). Each distinct grammar is compiled once (the
    ``cache_size`` most recently used are kept); a request gets a copy of the compiled matcher.
    """

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 64) -> None:
        self.end_ids = frozenset((tokenizer.eod_id, tokenizer.im_end_id))
        self.tokenizer = lltokenizer_from_encoding(tokenizer.tokenizer, n_vocab=vocab_size,
                                                   eos_token=sorted(self.end_ids))
        self.words = (vocab_size + 31) // 32  # the mask holds one bit per token in int32 words
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # requests are submitted from several threads

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for ``grammar``; ValueError if it does not compile."""
        with self._lock:
            compiled = self._compiled.pop(grammar, None)
            if compiled is None:
                compiled = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
                if compiled.is_error():
                    raise ValueError(f"invalid grammar: {compiled.get_error()}")
            self._compiled[grammar] = compiled  # most recently used last
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
            return compiled.deep_copy()

    def constrain(self, logits: torch.Tensor, rows: list[tuple[int, llguidance.LLMatcher]]) -> None:
        """Set ``logits[i]`` to -inf, in place, for every token the matcher of row ``i`` forbids now."""
        bitmask = torch.empty(len(rows), self.words, dtype=torch.int32)
        # One row after another: llguidance's thread-pool executor took 9 ms where this loop took 0.13
        # (8 rows, 2 busy cores), and a mask is cheap. What llguidance.torch's fill helper does,
        # without importing it: it imports torch._dynamo (seconds).
        for k, (_, matcher) in enumerate(rows):
            matcher.unsafe_compute_mask_ptr(bitmask[k].data_ptr(), self.words * 4)
        bits = bitmask.to(logits.device)
        bit = 1 << torch.arange(32, dtype=torch.int32, device=logits.device)  # bit j of word w: token 32w + j
        forbidden = ((bits[:, :, None] & bit) == 0).view(len(rows), -1)[:, : logits.shape[-1]]
        for k, (i, _) in enumerate(rows):
            logits[i].masked_fill_(forbidden[k], float("-inf"))
