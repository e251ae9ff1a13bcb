"""Fine-tuning data: the original conversations format, ChatML encoding with label masks, datasets, collator.

A data file is a JSON list (or JSON Lines, one sample a line) of samples::

    {"id": "identity_0",
     "system": "You are a helpful assistant.",          # optional, this is the default
     "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}]}

Each sample becomes one ChatML sequence: a system block, then one block per message. Labels follow
the original ``finetune.py`` (-100 = not trained):

* system and user blocks: only ``<|im_start|>``, ``<|im_end|>`` and the ``"\\n"`` after it are trained;
* assistant blocks: ``<|im_start|>`` is trained, the role line ``"assistant\\n"`` is masked, the
  content, ``<|im_end|>`` and ``"\\n"`` are trained.

Roles and contents are encoded with special tokens NOT allowed, so a message that contains the text
``<|im_end|>`` stays plain text (the original parsed it as a control token). Sequences longer than
``model_max_length`` are cut at the end and counted. Batches are padded on the right to their longest
sample by :class:`DataCollatorForSupervisedDataset` (pad id ``<|endoftext|>``, attention mask 0 and
label -100 on pads), instead of the original's padding of every sample to ``model_max_length``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IGNORE_TOKEN_ID = -100  # transformers' LabelSmoother.ignore_index: the loss skips these positions
DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("user", "assistant")
EOD_ID = 151643  # <|endoftext|>, the pad id of the original recipe


class DataError(ValueError):
    """A training data file cannot be used; the message names the file, the sample and the problem."""


# ----- reading and checking -----------------------------------------------------------------------


def _describe(sample: Any, index: int) -> str:
    sid = sample.get("id") if isinstance(sample, dict) else None
    return f"sample {index}" + (f" (id {sid!r})" if sid is not None else "")


def check_sample(sample: Any, index: int) -> None:
    """Raise DataError (without the file name) if ``sample`` is not a usable conversation."""
    where = _describe(sample, index)
    if not isinstance(sample, dict):
        raise DataError(f"{where} is a {type(sample).__name__}, not an object with a 'conversations' list")
    if "conversations" not in sample:
        keys = ", ".join(map(repr, sample)) or "none"
        raise DataError(f"{where} has no 'conversations' key (keys: {keys})")
    conversations = sample["conversations"]
    if not isinstance(conversations, list):
        raise DataError(f"{where}: 'conversations' is a {type(conversations).__name__}, not a list of messages")
    if not conversations:
        raise DataError(f"{where}: 'conversations' is empty; a sample needs at least one message")
    system = sample.get("system", DEFAULT_SYSTEM)
    if not isinstance(system, str):
        raise DataError(f"{where}: 'system' is a {type(system).__name__}, not a string")
    for j, message in enumerate(conversations):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise DataError(f"{where}, message {j} is a {kind}, not an object with 'from' and 'value'")
        for key in ("from", "value"):
            if key not in message:
                raise DataError(f"{where}, message {j} has no {key!r} key")
        role = message["from"]
        if role not in ROLES:
            hint = " (put a system prompt in the sample's 'system' field)" if role == "system" else ""
            raise DataError(f"{where}, message {j}: unknown role {role!r}; use 'user' or 'assistant'{hint}")
        if not isinstance(message["value"], str):
            raise DataError(f"{where}, message {j}: 'value' is a {type(message['value']).__name__}, not a string")
    if not any(m["from"] == "assistant" for m in conversations):
        raise DataError(f"{where} has no assistant message: there is no answer to learn")


def load_conversations(path: str | os.PathLike) -> list[dict]:
    """Read and check a data file (JSON list, or JSON Lines); every error names the sample at fault."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as line_exc:
                raise DataError(
                    f"{path} is neither a JSON list ({exc}) nor JSON Lines (line {lineno}: {line_exc})"
                ) from None
    if isinstance(data, dict) and "conversations" in data:
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of samples")
    if not data:
        raise DataError(f"{path} holds no samples")
    for i, sample in enumerate(data):
        try:
            check_sample(sample, i)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
    return data


# ----- encoding -----------------------------------------------------------------------------------


def _plain(tokenizer, text: str) -> list[int]:
    """Encode text with every special token treated as plain text."""
    return tokenizer.encode(text, allowed_special=set()) if text else []


def encode_conversation(
    tokenizer, conversations: Sequence[dict], system: str = DEFAULT_SYSTEM
) -> tuple[list[int], list[int]]:
    """ChatML ids and labels of one conversation (not truncated)."""
    im_start, im_end = tokenizer.im_start_id, tokenizer.im_end_id
    nl = _plain(tokenizer, "\n")

    def block(role: str, content: str) -> tuple[list[int], list[int]]:
        role_ids = _plain(tokenizer, role) + nl
        content_ids = _plain(tokenizer, content)
        ids = [im_start] + role_ids + content_ids + [im_end] + nl
        if role == "assistant":
            labels = [im_start] + [IGNORE_TOKEN_ID] * len(role_ids) + content_ids + [im_end] + nl
        else:  # system and user: only the markers and the newline after <|im_end|> are trained
            labels = [im_start] + [IGNORE_TOKEN_ID] * (len(role_ids) + len(content_ids)) + [im_end] + nl
        return ids, labels

    input_ids, labels = block("system", system)
    for message in conversations:
        if message["from"] not in ROLES:
            raise DataError(f"unknown role {message['from']!r}; use 'user' or 'assistant'")
        ids, lab = block(message["from"], message["value"])
        input_ids += ids
        labels += lab
    return input_ids, labels


def preprocess_sample(tokenizer, sample: dict, max_len: int) -> dict[str, Any]:
    """``{"input_ids", "labels", "length", "truncated"}`` of one checked sample, cut to ``max_len``."""
    ids, labels = encode_conversation(tokenizer, sample["conversations"], sample.get("system", DEFAULT_SYSTEM))
    return {
        "input_ids": ids[:max_len],
        "labels": labels[:max_len],
        "length": len(ids),
        "truncated": len(ids) > max_len,
    }


def preprocess(sources: Sequence[Sequence[dict]], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM):
    """The original function's shape: conversations in, padded ``input_ids``/``labels``/``attention_mask`` out.

    Unlike the original, sequences are padded to the longest one (not to ``max_len``).
    """
    rows = [encode_conversation(tokenizer, source, system_message) for source in sources]
    features = [{"input_ids": ids[:max_len], "labels": lab[:max_len]} for ids, lab in rows]
    return DataCollatorForSupervisedDataset()(features)


# ----- datasets -----------------------------------------------------------------------------------


class _TruncationLog:
    """Counts truncated samples and warns about the first few."""

    shown = 5

    def __init__(self, name: str, max_len: int) -> None:
        self.name, self.max_len, self.indices = name, max_len, set()

    def add(self, index: int, sample: dict, length: int) -> None:
        if index in self.indices:
            return
        self.indices.add(index)
        if len(self.indices) <= self.shown:
            logger.warning(
                "%s %s has %d tokens: truncated to model_max_length %d",
                self.name, _describe(sample, index), length, self.max_len,
            )

    @property
    def count(self) -> int:
        return len(self.indices)


class SupervisedDataset(Dataset):
    """Every sample encoded up front; the truncation count is known at once."""

    def __init__(self, samples: list[dict], tokenizer, max_len: int, name: str = "train") -> None:
        self.samples = samples
        self.truncation = _TruncationLog(name, max_len)
        self.items = []
        for i, sample in enumerate(samples):
            item = preprocess_sample(tokenizer, sample, max_len)
            if item["truncated"]:
                self.truncation.add(i, sample, item["length"])
            self.items.append({"input_ids": item["input_ids"], "labels": item["labels"]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


class LazySupervisedDataset(Dataset):
    """Samples are checked up front but encoded when first read (then cached), like ``--lazy_preprocess``."""

    def __init__(self, samples: list[dict], tokenizer, max_len: int, name: str = "train") -> None:
        self.samples, self.tokenizer, self.max_len = samples, tokenizer, max_len
        self.truncation = _TruncationLog(name, max_len)
        self.cache: dict[int, dict[str, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if i not in self.cache:
            item = preprocess_sample(self.tokenizer, self.samples[i], self.max_len)
            if item["truncated"]:
                self.truncation.add(i, self.samples[i], item["length"])
            self.cache[i] = {"input_ids": item["input_ids"], "labels": item["labels"]}
        return self.cache[i]


@dataclass
class DataCollatorForSupervisedDataset:
    """Pad a batch on the right to its longest sample: pad id ``pad_token_id``, attention mask 0, label -100."""

    pad_token_id: int = EOD_ID
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_TOKEN_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_supervised_data_module(
    tokenizer, data_path: str, eval_data_path: str | None, max_len: int, lazy_preprocess: bool = False
) -> dict[str, Any]:
    """``train_dataset``, ``eval_dataset`` and ``data_collator`` for ``transformers.Trainer``.

    Files are read and checked first, so a bad sample fails before any training work.
    """
    cls = LazySupervisedDataset if lazy_preprocess else SupervisedDataset
    train_samples = load_conversations(data_path)
    eval_samples = load_conversations(eval_data_path) if eval_data_path else None
    train = cls(train_samples, tokenizer, max_len, "train")
    evaluation = cls(eval_samples, tokenizer, max_len, "eval") if eval_samples is not None else None
    pad_id = getattr(tokenizer, "eod_id", EOD_ID)
    return {
        "train_dataset": train,
        "eval_dataset": evaluation,
        "data_collator": DataCollatorForSupervisedDataset(pad_token_id=pad_id),
    }
