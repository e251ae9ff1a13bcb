"""QWenTokenizer: Qwen v1's tiktoken byte-level BPE as a transformers tokenizer.

The vocabulary is ``qwen.tiktoken`` (151,643 ``base64(token) rank`` lines) followed by 208 special
tokens. A copy of the file ships inside this package, so ``QWenTokenizer()`` works without any
checkpoint folder. Encoding goes straight to tiktoken's Rust core (no per-token Python work) so the
wrapper costs little over raw tiktoken.

For chat tooling (``apply_chat_template``, lm-eval, TRL) the tokenizer names ``<|endoftext|>`` as its
eos token and carries a ChatML chat template whose ids equal ``qwen.chat.make_context``'s.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
import re
import secrets
import unicodedata
from collections.abc import Collection, Iterable, Mapping
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
SPECIAL_RE = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")

# ChatML exactly as qwen.chat.make_context writes it (no newline after the last <|im_end|>; system default
# "You are a helpful assistant."; contents as given). With tools, as qwen.serve.prompting renders them: the
# ReAct instruction goes before the last user message, each tool call is a Thought/Action/Action Input step
# followed by the Observation of the tool message answering it (in order), and a plain assistant reply gets
# the "Thought: ... Final answer: " prefix. A conversation that ends in a tool result stays inside the
# assistant turn, at "Thought:", where the model writes its next step.
CHAT_TEMPLATE = r"""
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro react(tools) -%}
{%- set ns = namespace(descs=[], names=[]) -%}
{%- for tool in tools -%}
{%- set f = tool.function if tool.function is defined else tool -%}
{%- set ns.names = ns.names + [f.name] -%}
{%- set ns.descs = ns.descs + [f.name ~ ': Call this tool to interact with the ' ~ f.name ~ ' API. What is the '
    ~ f.name ~ ' API useful for? ' ~ (f.description or '') ~ ' Parameters: ' ~ (f.parameters or {}) | tojson] -%}
{%- endfor -%}
{{- 'Answer the following questions as best you can. You have access to the following APIs:\n\n'
    ~ ns.descs | join('\n\n') ~ '\n\nUse the following format:\n\n'
    ~ 'Question: the input question you must answer\n'
    ~ 'Thought: you should always think about what to do\n'
    ~ 'Action: the action to take, should be one of [' ~ ns.names | join(', ') ~ ']\n'
    ~ 'Action Input: the input to the action\n'
    ~ 'Observation: the result of the action\n'
    ~ '... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n'
    ~ 'Thought: I now know the final answer\n'
    ~ 'Final Answer: the final answer to the original input question\n\nBegin!' -}}
{%- endmacro -%}
{%- macro assistant(m, question, react, results) -%}
{%- set calls = namespace(list=[]) -%}
{%- for c in (m.tool_calls or []) + ([m.function_call] if m.function_call is defined else []) -%}
{%- set calls.list = calls.list + [c.function if c.function is defined else c] -%}
{%- endfor -%}
{%- if calls.list -%}
{%- set thought = text(m.content) | trim -%}
{%- if thought.startswith('Thought:') -%}{%- set thought = thought[8:] | trim -%}{%- endif -%}
{%- for c in calls.list -%}
{{- ('' if loop.first else '\n') ~ 'Thought: ' ~ ((thought if loop.first else '') or 'I can use ' ~ c.name ~ '.')
    ~ '\nAction: ' ~ c.name ~ '\nAction Input: ' ~ (c.arguments if c.arguments is string else c.arguments | tojson) -}}
{%- if loop.index0 < results | length -%}{{- '\nObservation: ' ~ results[loop.index0] -}}{%- endif -%}
{%- endfor -%}
{%- elif react -%}
{%- set zh = namespace(found=false) -%}
{%- for ch in question if '\u4e00' <= ch <= '\u9fff' -%}{%- set zh.found = true -%}{%- endfor -%}
{{- ('Thought: 我会作答了。' if zh.found else 'Thought: I now know the final answer.') ~ '\nFinal answer: ' -}}
{{- text(m.content) -}}
{%- else -%}{{- text(m.content) -}}
{%- endif -%}
{%- endmacro -%}
{%- set last_user = (messages | selectattr('role', 'equalto', 'user') | list | length) - 1 -%}
{%- set ns = namespace(users=0, question='', prev='') -%}
{%- if messages[0].role not in ('system', 'developer') -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>' -}}
{%- endif -%}
{%- for m in messages -%}
{%- set result = m.role in ('tool', 'function') -%}
{%- set same_turn = result or (m.role == 'assistant' and ns.prev == 'result') -%}
{%- if ns.prev in ('assistant', 'result') and not same_turn -%}{{- '<|im_end|>' -}}{%- endif -%}
{%- if loop.first and m.role in ('system', 'developer') -%}
{{- '<|im_start|>system\n' ~ text(m.content) ~ '<|im_end|>' -}}
{%- elif m.role == 'user' -%}
{%- set ns.question = text(m.content) -%}
{{- '\n<|im_start|>user\n' -}}
{%- if tools and ns.users == last_user -%}{{- react(tools) ~ '\n\nQuestion: ' -}}{%- endif -%}
{{- ns.question ~ '<|im_end|>' -}}
{%- set ns.users = ns.users + 1 -%}
{%- elif result -%}
{{- '\nThought:' if loop.last else '' -}}
{%- elif m.role == 'assistant' -%}
{%- set results = namespace(list=[], open=true) -%}
{%- for r in messages[loop.index0 + 1:] -%}
{%- set results.open = results.open and r.role in ('tool', 'function') -%}
{%- if results.open -%}{%- set results.list = results.list + [text(r.content)] -%}{%- endif -%}
{%- endfor -%}
{{- ('\n' if same_turn else '\n<|im_start|>assistant\n')
    ~ assistant(m, ns.question, tools or same_turn, results.list) -}}
{%- else -%}
{{- '\n<|im_start|>' ~ m.role ~ '\n' ~ text(m.content) ~ '<|im_end|>' -}}
{%- endif -%}
{%- set ns.prev = 'result' if result else m.role -%}
{%- endfor -%}
{%- if ns.prev == 'assistant' -%}{{- '<|im_end|>' -}}{%- endif -%}
{%- if add_generation_prompt and ns.prev != 'result' -%}{{- '\n<|im_start|>assistant\n' -}}{%- endif -%}
"""


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


def _mark_special_text(value: Any, marker: str) -> Any:
    """``value`` (messages, tools or documents: dicts, lists, dataclasses, pydantic models) as plain data with
    ``<|`` in every string replaced by ``marker``, so that no special-token text is left in it."""
    if isinstance(value, str):
        return value.replace("<|", marker)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif callable(getattr(value, "model_dump", None)):
        value = value.model_dump()
    if isinstance(value, Mapping):
        return {key: _mark_special_text(item, marker) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark_special_text(item, marker) for item in value]
    return value


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen v1 tokenizer (tiktoken BPE, NFC-normalised input, no BOS/EOS added).

    ``encode``/``__call__``/``tokenize`` parse special-token text as control tokens by default
    (``allowed_special="all"``), exactly like the original; pass ``allowed_special=set()`` to treat
    it as plain text, or ``disallowed_special="all"`` to refuse it. There is no pad token unless you
    give one (batch users pass ``pad_token="<|extra_0|>"`` and ``padding_side="left"``). ``eos_token`` is
    ``<|endoftext|>``, named for tooling and never added to encodings. ``apply_chat_template`` renders
    ChatML as ``make_context`` does and always encodes the messages' special-token text as plain text.
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
        # Chat tooling (lm-eval, TRL, generation stops) needs an eos token; the original named none. No bos,
        # pad or unk: Qwen adds no bos, has no unknown bytes, and pad stays the caller's choice.
        kwargs.setdefault("eos_token", ENDOFTEXT)
        if kwargs.get("chat_template") is None:
            kwargs["chat_template"] = CHAT_TEMPLATE
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
        chat_marker = kwargs.pop("chat_marker", None)  # set by apply_chat_template

        def to_ids(item: Any) -> Any:
            if isinstance(item, str) and item:
                if chat_marker:
                    return self._encode_rendered_chat(item, chat_marker)
                return self._encode_ids(item, allowed, disallowed)
            return item

        if not kwargs.get("is_split_into_words"):
            if isinstance(text, (list, tuple)) and text and isinstance(text[0], str):
                text = [to_ids(t) for t in text]
                text_pair = [to_ids(t) for t in text_pair] if text_pair is not None else None
            else:
                text, text_pair = to_ids(text), to_ids(text_pair)
        return super()._encode_plus(text, text_pair, **kwargs)

    def _encode_rendered_chat(self, text: str, marker: str) -> list[int]:
        """Ids of a chat rendered from inputs whose ``<|`` became ``marker``: the special tokens left are
        the template's own, and every other piece is plain text. As in ``make_context``, a block's role
        and its content are encoded apart, so content that starts with a newline gets the same ids."""
        ids: list[int] = []
        after_start = False
        for i, piece in enumerate(SPECIAL_RE.split(text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
                after_start = piece == IM_START
                continue
            piece = piece.replace(marker, "<|")
            if after_start:
                role, newline, piece = piece.partition("\n")
                ids += self._encode_ids(role, allowed_special=set()) + self._encode_ids(newline)
            ids += self._encode_ids(piece, allowed_special=set())
        return ids

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[Any] | None = None,
        documents: list[Any] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' ``apply_chat_template``, with special-token text in messages, tools and documents
        always encoded as plain text (as ``make_context`` does), not only under ``sanitize_control_tokens``.

        A user who types ``<|im_end|>`` must not end a turn. transformers' own sanitizing encodes such text
        apart from its surroundings, which gives other ids than ``make_context``; here ``<|`` in every input
        string is swapped for a random marker before rendering and swapped back inside each text piece, so
        the pieces are encoded whole. With ``tokenize=False`` the text is rendered unchanged.
        """
        kwargs.pop("sanitize_control_tokens", None)
        if kwargs.get("tokenize", True):
            marker = f"\ue000{secrets.token_hex(8)}\ue001"
            conversation = getattr(conversation, "messages", conversation)  # a Conversation-like object
            conversation, tools, documents = (_mark_special_text(x, marker) for x in (conversation, tools, documents))
            kwargs["tokenizer_kwargs"] = {**(kwargs.get("tokenizer_kwargs") or {}), "chat_marker": marker}
        return super().apply_chat_template(conversation, tools, documents, chat_template, **kwargs)

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
            token_ids = [i for i in token_ids if not isinstance(self.decoder.get(i), str)]  # specials are str
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
