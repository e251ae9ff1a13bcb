"""QWenTokenizer: Qwen v1's tiktoken byte-level BPE as a transformers tokenizer.

The vocabulary is ``qwen.tiktoken`` (151,643 ``base64(token) rank`` lines) followed by 208 special
tokens. A copy of the file ships inside this package, so ``QWenTokenizer()`` works without any
checkpoint folder. Encoding goes straight to tiktoken's Rust core (no per-token Python work) so the
wrapper costs little over raw tiktoken.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import unicodedata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import tiktoken
from transformers import PreTrainedTokenizer

logger = logging.getLogger(__name__)

VOCAB_FILE = "qwen.tiktoken"
EXTRA_VOCAB_FILE = "qwen_extra.tiktoken"
BUNDLED_VOCAB = Path(__file__).with_name(VOCAB_FILE)
VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

# The pre-tokenizer split pattern of Qwen v1 (a fact of the original vocabulary; must stay exact).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_START_ID = 151643  # ids of the special tokens start here, whatever the vocabulary file holds


class VocabFileError(ValueError):
    """A vocabulary file is missing or not in the ``base64(token) rank`` format."""


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file into ``{token bytes: rank}``, naming the bad line if it is corrupt."""
    path = Path(path)
    if not path.is_file():
        raise VocabFileError(
            f"Qwen vocabulary file not found: {path}. A Qwen checkpoint folder carries {VOCAB_FILE}; "
            f"copy it there, or leave vocab_file unset to use the copy shipped with the qwen package."
        )
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                # tiktoken panics (uncatchable) or overflows on duplicates and out-of-range ranks.
                if not 0 <= rank < 2**32 or rank in seen_ranks or token in ranks:
                    raise ValueError
                ranks[token] = rank
                seen_ranks.add(rank)
            except (ValueError, binascii.Error):
                raise VocabFileError(
                    f"{path} line {lineno} is not '<base64 token> <rank>': {line[:80]!r}. The file is "
                    f"corrupt or not a tiktoken vocabulary; replace it with the original {VOCAB_FILE}."
                ) from None
    if not ranks:
        raise VocabFileError(f"{path} is empty; replace it with the original {VOCAB_FILE}.")
    return ranks


def _write_tiktoken_ranks(ranks: dict[bytes, int], path: Path) -> None:
    with path.open("wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen v1 tokenizer (tiktoken BPE, NFC-normalised input, no BOS/EOS added).

    ``encode``/``__call__``/``tokenize`` parse special-token text as control tokens by default
    (``allowed_special="all"``), exactly like the original; pass ``allowed_special=set()`` to treat
    it as plain text, or ``disallowed_special="all"`` to refuse it. There is no pad token unless you
    give one (batch users pass ``pad_token="<|extra_0|>"`` and ``padding_side="left"``).
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE, "extra_vocab_file": EXTRA_VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        errors: str = "replace",
        extra_vocab_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        self.errors = errors
        self.base_ranks = load_tiktoken_ranks(vocab_file or BUNDLED_VOCAB)
        if max(self.base_ranks.values()) >= SPECIAL_START_ID:
            raise VocabFileError(
                f"{vocab_file or BUNDLED_VOCAB} has ranks >= {SPECIAL_START_ID}, where Qwen's special tokens "
                f"live: it is not the Qwen vocabulary. Use the original {VOCAB_FILE}."
            )
        self.special_tokens = {tok: i for i, tok in enumerate(SPECIAL_TOKENS, start=SPECIAL_START_ID)}
        self.extra_ranks = self._usable_extra_ranks(extra_vocab_file) if extra_vocab_file else {}
        self.mergeable_ranks = {**self.base_ranks, **self.extra_ranks}
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        # id -> token: bytes for BPE tokens, str for special tokens (as the original tokenizer does).
        self.decoder: dict[int, bytes | str] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        super().__init__(errors=errors, **kwargs)

    def _usable_extra_ranks(self, extra_vocab_file: str | os.PathLike) -> dict[bytes, int]:
        """Extra tokens are kept only where both their text and their id are still free."""
        used_ids = set(self.base_ranks.values()) | set(self.special_tokens.values())
        kept: dict[bytes, int] = {}
        for token, rank in load_tiktoken_ranks(extra_vocab_file).items():
            if token in self.base_ranks or rank in used_ids:
                logger.warning("extra token %r (id %d) clashes with the base vocabulary; skipped", token, rank)
                continue
            kept[token] = rank
            used_ids.add(rank)
        return kept

    # ----- sizes and vocabulary -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    def _add_tokens(self, new_tokens: Iterable[Any], special_tokens: bool = False) -> int:
        """The vocabulary is fixed: only the existing special tokens may be named (e.g. as pad)."""
        for token in new_tokens:
            if str(token) not in self.special_tokens:
                raise ValueError(
                    f"Cannot add token {str(token)!r}: Qwen's vocabulary is fixed. Use one of the "
                    f"reserved tokens <|extra_0|> .. <|extra_204|>, or pass extra_vocab_file."
                )
        return 0

    # ----- encoding ---------------------------------------------------------------------------
    def _encode_ids(
        self,
        text: str,
        allowed_special: Collection[str] | str = "all",
        disallowed_special: Collection[str] | str = (),
    ) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        if "<|" not in text:  # no special-token text possible: skip handing the special set to Rust
            return self.tokenizer.encode_ordinary(text)
        return self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def tokenize(
        self,
        text: str,
        allowed_special: Collection[str] | str = "all",
        disallowed_special: Collection[str] | str = (),
        **kwargs: Any,
    ) -> list[bytes | str]:
        """Tokens as bytes (BPE pieces) or str (special tokens), like the original tokenizer."""
        return [self.decoder[i] for i in self._encode_ids(text, allowed_special, disallowed_special)]

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:
        # Turn strings into ids here, in one tiktoken call each; transformers then only pads,
        # truncates and builds tensors. Empty strings stay strings (transformers rejects []).
        allowed = kwargs.pop("allowed_special", "all")
        disallowed = kwargs.pop("disallowed_special", ())

        def to_ids(item: Any) -> Any:
            if isinstance(item, str) and item:
                return self._encode_ids(item, allowed, disallowed)
            return item

        if not kwargs.get("is_split_into_words"):
            if isinstance(text, (list, tuple)) and text and isinstance(text[0], str):
                text = [to_ids(t) for t in text]
                text_pair = [to_ids(t) for t in text_pair] if text_pair is not None else None
            else:
                text, text_pair = to_ids(text), to_ids(text_pair)
        return super()._encode_plus(text, text_pair, **kwargs)

    def convert_tokens_to_ids(self, tokens: bytes | str | list[bytes | str]) -> int | list[int]:
        if isinstance(tokens, (bytes, str)):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(t) for t in tokens]

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            token = token.encode("utf-8")
        if token in self.mergeable_ranks:
            return self.mergeable_ranks[token]
        raise ValueError(f"{token!r} is not a token of the Qwen vocabulary")

    # ----- decoding ---------------------------------------------------------------------------
    def _convert_id_to_token(self, index: int) -> bytes | str:
        if index in self.decoder:
            return self.decoder[index]
        raise ValueError(f"id {index} is not in the Qwen vocabulary (0..{len(self) - 1})")

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        data = b"".join(t.encode("utf-8") if isinstance(t, str) else t for t in tokens)
        return data.decode("utf-8", errors=self.errors)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Decode with tiktoken. Ids with no token (the embedding's padding rows 151851..151935,
        which an untrained or damaged model can emit) are dropped instead of raising."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < self.eod_id]
        token_ids = [i for i in token_ids if i in self.decoder]
        return self.tokenizer.decode(token_ids, errors=errors or self.errors)

    # ----- saving -----------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        out = [Path(save_directory) / f"{prefix}{VOCAB_FILE}"]
        _write_tiktoken_ranks(self.base_ranks, out[0])
        if self.extra_ranks:
            out.append(Path(save_directory) / f"{prefix}{EXTRA_VOCAB_FILE}")
            _write_tiktoken_ranks(self.extra_ranks, out[1])
        return tuple(str(p) for p in out)
