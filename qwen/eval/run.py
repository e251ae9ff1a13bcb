"""What every evaluation script shares: flags, the model or server it queries, the per-item log that
lets an interrupted run resume, and the results file and table at the end.

A backend answers three kinds of questions: next-token probabilities of the answer letters (a local
model only), chat replies, and plain-text completions. The local backend batches them (one forward
pass per batch of multiple-choice prompts, continuous batching in ``qwen.engine.Engine`` for
generation); the API backend sends concurrent requests to any OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import EvalError

# ----- flags ---------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, default_checkpoint: str, api: bool = True) -> None:
    """The original scripts' -c/-s plus the harness conveniences and the shared model flags."""
    from qwen.loading import add_lora_arg, add_model_args, add_prefix_cache_arg, positive_int

    parser.add_argument("-c", "--checkpoint-path", default=default_checkpoint,
                        help="original Qwen checkpoint folder (default: %(default)s)")
    parser.add_argument("-s", "--seed", type=int, default=1234, help="random seed (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="evaluate only the first N items (of each subject, for the subject benchmarks)")
    parser.add_argument("--output-json", metavar="PATH", help="write results, counts, config and versions here")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh instead of resuming from the per-item log of an earlier run")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="prompts per forward pass / sequences decoded at once (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                        help="generation length (default: the checkpoint's generation_config.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = parser.add_argument_group("model flags (local checkpoint)")
    add_model_args(group)
    add_lora_arg(group)
    add_prefix_cache_arg(group)
    if api:
        group = parser.add_argument_group("OpenAI-compatible server (instead of a local checkpoint)")
        group.add_argument("--api-base", metavar="URL", help="e.g. http://127.0.0.1:8000/v1")
        group.add_argument("--api-key", default="EMPTY", help="API key for --api-base (default: %(default)s)")
        group.add_argument("--model", help="model name on the server (default: the first of GET /models)")
        group.add_argument("--concurrency", type=positive_int, default=8,
                           help="requests in flight at once (default: %(default)s)")


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main_guard(run: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script: bad input (EvalError) ends with its message and status 2, not a traceback."""
    try:
        run(argv)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted: finished items are kept in the per-item log; run the same command to resume",
              file=sys.stderr)
        raise SystemExit(130) from None


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or total == 0, dynamic_ncols=True)


# ----- backends ------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One generation: a chat message (``chat=True``) or a raw completion prompt. ``stops`` are cut
    markers: generation may end at the first one, since the text after it is discarded anyway."""

    prompt: str
    chat: bool
    stops: Sequence[str] = ()


@dataclass
class Backend:
    name: str  # what the results file records as the model
    max_new_tokens: int | None = None
    info: dict = field(default_factory=dict)

    def generate(self, requests: Sequence[Request], show: bool) -> Iterator[tuple[int, str]]:
        raise NotImplementedError

    def choice_probs(self, prompts: Sequence[str], spaced_letters: bool, batch_size: int, truncate: int | None,
                     on_batch: Callable, show: bool) -> None:
        raise EvalError(
            "the base multiple-choice scripts score the answer letters' next-token probabilities, which needs "
            "a local model: pass -c CHECKPOINT_FOLDER instead of --api-base (or use the evaluate_chat_* scripts, "
            "which work with any server)"
        )


class LocalBackend(Backend):
    """A checkpoint folder loaded with this package (``qwen.loading``: --int8, --kv-cache-int8 ...)."""

    def __init__(self, args: argparse.Namespace, chat: bool) -> None:
        from qwen.loading import (
            CheckpointNotFoundError,
            checkpoint_folder,
            engine_settings,
            load_model,
            prefix_cache_bytes,
        )
        from qwen.lora import AdapterError, load_lora

        try:
            path = checkpoint_folder(args.checkpoint_path)
        except CheckpointNotFoundError as exc:
            raise EvalError(f"no checkpoint folder: {exc} Pass -c DIR; for a quick try, `python -m qwen.tiny DIR` "
                            "writes a tiny random one.") from None
        self.model, self.tokenizer = load_model(path, args)
        try:  # a fine-tune measured without merging it
            self.adapter = load_lora(self.model, args.lora) if args.lora else None
        except AdapterError as exc:
            raise EvalError(f"--lora {args.lora}: {exc}") from None
        config = self.model.generation_config
        self.chat_model = (getattr(config, "chat_format", None) or "raw") == "chatml"
        if chat and not self.chat_model:
            raise EvalError(f"{path} is a base model (chat_format 'raw'): the chat scripts need a -Chat checkpoint")
        name = f"{path} + LoRA {self.adapter.path}" if self.adapter is not None else str(path)
        super().__init__(name=name, max_new_tokens=args.max_new_tokens or config.max_new_tokens or 512)
        # Chat scripts set repetition_penalty 1.0; base scripts keep the checkpoint's.
        self.base_penalty = getattr(config, "repetition_penalty", None) or 1.0
        self.max_window_size = getattr(config, "max_window_size", None) or 6144
        self.batch_size = args.batch_size
        self.prefix_cache_bytes = prefix_cache_bytes(args)
        try:
            self.engine_settings = engine_settings(args)
        except ValueError as exc:  # a draft model that cannot be loaded
            raise EvalError(str(exc)) from None

    def choice_probs(self, prompts, spaced_letters, batch_size, truncate, on_batch, show) -> None:
        from qwen.lora import use_lora

        from .scoring import letter_ids, score_choices

        ids = [self.tokenizer.encode(p) for p in prompts]
        if truncate:
            ids = [p[-(truncate - 1):] if len(p) > truncate else p for p in ids]
        bar = progress(len(ids), "scoring", show)

        def done(batch: list[int], probs) -> None:
            on_batch(batch, probs.tolist())
            bar.update(len(batch))

        pad = self.tokenizer.special_tokens["<|extra_0|>"]
        with use_lora(self.adapter):
            score_choices(self.model, ids, letter_ids(self.tokenizer, spaced_letters), pad, batch_size, done,
                          share_prefix=self.prefix_cache_bytes > 0)
        bar.close()

    def prompt_ids(self, request: Request) -> list[int]:
        from qwen.chat import DEFAULT_SYSTEM, make_context

        if request.chat:
            return make_context(self.tokenizer, request.prompt, None, DEFAULT_SYSTEM, self.max_window_size)[1]
        return self.tokenizer.encode(request.prompt, allowed_special=set(), disallowed_special=())

    def generate(self, requests, show) -> Iterator[tuple[int, str]]:
        """Greedy generations through the engine, yielded as each finishes (in any order)."""
        from qwen.engine import Engine
        from qwen.sampling import SamplingParams

        tok = self.tokenizer
        prompts = [self.prompt_ids(r) for r in requests]
        longest = max((len(p) for p in prompts), default=0)
        try:
            engine = Engine(self.model, tok, max_batch_size=self.batch_size,
                            max_model_len=max(self.model.config.seq_length, longest + self.max_new_tokens + 1),
                            prefix_cache_bytes=self.prefix_cache_bytes, **self.engine_settings)
        except ValueError as exc:  # settings the engine refuses
            raise EvalError(str(exc)) from None
        finished: queue.Queue = queue.Queue()
        engine.start()
        try:
            for index, (request, ids) in enumerate(zip(requests, prompts, strict=True)):
                chat_stops = [tok.im_end_id, tok.im_start_id] if request.chat else []
                params = SamplingParams(
                    max_new_tokens=self.max_new_tokens, do_sample=False,
                    repetition_penalty=1.0 if request.chat else self.base_penalty,
                    stop_token_ids=chat_stops + [tok.eod_id], stop=list(request.stops),
                )
                engine.submit(ids, params, lambda seq, _t, last, i=index: last and finished.put((i, seq)),
                              self.adapter)
            for _ in range(len(requests)):
                index, seq = finished.get()
                if seq.finish_reason.startswith("error"):
                    raise RuntimeError(f"generation failed: {seq.finish_reason}")
                yield index, seq.text.strip() if requests[index].chat else seq.text
        finally:
            engine.stop()


class APIBackend(Backend):
    """Any OpenAI-compatible server: chat replies from /chat/completions, raw completions from
    /completions, greedy (temperature 0), ``--concurrency`` requests in flight."""

    def __init__(self, args: argparse.Namespace) -> None:
        import openai

        self.client = openai.OpenAI(base_url=args.api_base, api_key=args.api_key, max_retries=2, timeout=600)
        try:
            model = args.model or self.client.models.list().data[0].id
        except (openai.APIError, IndexError) as exc:
            raise EvalError(f"cannot list the models of {args.api_base} ({exc}); check --api-base/--api-key, "
                            "or pass --model") from None
        super().__init__(name=f"{model} @ {args.api_base}", max_new_tokens=args.max_new_tokens)
        self.model, self.concurrency = model, args.concurrency

    def ask(self, request: Request) -> str:
        common = {"model": self.model, "temperature": 0, "max_tokens": self.max_new_tokens}
        if request.chat:
            # The chat scripts decode without a repetition penalty; servers that know the field honour it.
            reply = self.client.chat.completions.create(
                messages=[{"role": "user", "content": request.prompt}],
                extra_body={"repetition_penalty": 1.0}, **common)
            return (reply.choices[0].message.content or "").strip()
        reply = self.client.completions.create(prompt=request.prompt, stop=list(request.stops)[:4] or None, **common)
        return reply.choices[0].text

    def generate(self, requests, show) -> Iterator[tuple[int, str]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self.ask, r): i for i, r in enumerate(requests)}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for future in futures:
                    future.cancel()


def open_backend(args: argparse.Namespace, chat: bool) -> Backend:
    if getattr(args, "api_base", None):
        if args.lora:
            raise EvalError("--lora loads an adapter onto a local checkpoint; a server serves its adapters under "
                            "their names: pass --model ADAPTER_NAME with --api-base instead")
        return APIBackend(args)
    return LocalBackend(args, chat)


# ----- per-item log (resume) -----------------------------------------------------------------------------


def run_id(settings: dict) -> str:
    """A short fingerprint of what decides the answers (model, prompts, rules): items logged under
    another fingerprint are never mixed into this run's scores."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class ItemLog:
    """JSONL of finished items, one line each, appended and flushed as they finish. Rerunning the same
    command resumes: items already in the file are not asked again."""

    def __init__(self, path: str | Path, run: str, overwrite: bool) -> None:
        self.path, self.run = Path(path), run
        self.done: dict[str, dict] = {}
        if self.path.exists() and not overwrite:
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise EvalError(f"{self.path}:{number} is not JSON; fix or delete the line, or pass "
                                    "--overwrite to start afresh") from None
                if record.get("run_id") != run:
                    raise EvalError(
                        f"{self.path} holds items of another run (different model, data or settings). Pass "
                        "--overwrite to replace it, or write this run elsewhere (-o / --out-dir)."
                    )
                self.done[record["doc_id"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a" if self.done else "w", encoding="utf-8")
        if self.done:
            print(f"resuming: {len(self.done)} items already in {self.path}", file=sys.stderr)

    def add(self, record: dict) -> None:
        record = {"doc_id": record["doc_id"], "run_id": self.run, **record}
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        self.done[record["doc_id"]] = record

    def close(self) -> None:
        self.file.close()


# ----- results -------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {}
    for package in ("qwen", "torch", "transformers", "openai"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_results(path: str | Path | None, task: str, scores: dict, n_samples: dict, config: dict,
                  started: float, extra: dict | None = None) -> dict:
    """The results document (lm-eval-harness-like keys); written to ``path`` when given."""
    document = {
        "results": {task: scores},
        "n-samples": {task: n_samples},
        "config": config,
        "versions": versions(),
        "date": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "seconds": round(time.time() - started, 2)},
        **(extra or {}),
    }
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return document


def print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """A two-column Markdown table (numbers with one decimal, as the published tables)."""
    cells = [(name, f"{value:.1f}" if isinstance(value, float) else str(value)) for name, value in rows]
    width = max([len(title)] + [len(n) for n, _ in cells])
    value_width = max([5] + [len(v) for _, v in cells])
    print(f"| {title:<{width}} | {'score':>{value_width}} |")
    print(f"|{'-' * (width + 2)}|{'-' * (value_width + 1)}:|")
    for name, value in cells:
        print(f"| {name:<{width}} | {value:>{value_width}} |")
