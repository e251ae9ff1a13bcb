"""Command line of the API server (``python openai_api.py``): load a checkpoint, serve it."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path

from ..entry_points import program_name
from ..loading import (
    DEMO_NAME,
    add_model_args,
    add_prefix_cache_arg,
    engine_settings,
    front_end_checkpoint,
    load_model,
    non_negative_float,
    positive_int,
    prefix_cache_bytes,
)
from ..ports import API_PORT, port_number, port_problem
from ..prefix_cache import PREFILL_CHUNK
from .response_store import MAX_STORED_RESPONSES

NO_CHECKPOINT = """error: no checkpoint given. Pass -c/--checkpoint-path with an original Qwen v1 folder
(e.g. a downloaded Qwen-7B-Chat: config.json, model*.safetensors, qwen.tiktoken, ...).
To try the server without one, --demo serves a tiny random model (its replies are random text)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=program_name("openai_api.py"),
                                description="OpenAI-compatible API for a Qwen v1 checkpoint")
    p.add_argument("-c", "--checkpoint-path", help="original Qwen checkpoint folder")
    p.add_argument("--demo", action="store_true",
                   help=f"serve a tiny random model named {DEMO_NAME} (no download; replies are random text)")
    p.add_argument("--api-auth", help="require HTTP Basic auth, as user:password")
    p.add_argument("--api-keys", default=os.environ.get("QWEN_API_KEYS", ""),
                   help="comma-separated Bearer keys to accept (default: $QWEN_API_KEYS)")
    p.add_argument("--server-port", type=port_number, default=API_PORT, help="port to listen on (default: %(default)s)")
    p.add_argument("--server-name", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--disable-gc", action="store_true", help="turn off Python's garbage collector (fewer pauses)")
    p.add_argument("--model-name", help="model id clients must send (default: the folder's name)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="requests decoded together")
    p.add_argument("--max-model-len", type=positive_int,
                   help="prompt + output limit (default: 4x the model's seq_length when it uses dynamic NTK, "
                        "as the original ran past seq_length with dynamic NTK + logn; else seq_length)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests that may wait for a batch slot; more are answered 503 with Retry-After "
                        "(default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU: several times faster decoding there); "
                        "compiles at start-up, a minute or more")
    add_prefix_cache_arg(p)
    p.add_argument("--prefill-chunk", type=positive_int, metavar="TOKENS",
                   help="the most prompt tokens prefilled per step, between which running streams decode: smaller "
                        "keeps streams smoother while a long prompt is read, larger serves bursts of prompts "
                        f"faster (default: {PREFILL_CHUNK})")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", type=lora_module,
                   help="serve a LoRA adapter folder (finetune.py --use_lora's output) beside the base, unmerged: "
                        "requests with model NAME use it (repeat for more; DIR alone names it after its folder)")
    p.add_argument("--max-loras", type=non_negative_int, default=4,
                   help="the most LoRA adapters loaded at once, from --lora and POST /v1/load_lora_adapter; 0 turns "
                        "loading at run time off (default: %(default)s, or the number of --lora if more)")
    p.add_argument("--shutdown-timeout", type=non_negative_float, default=25.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C: new requests get 503 while running ones finish, for at most this long; "
                        "those still running then end with finish_reason \"abort\", and the server exits 0. A second "
                        "signal stops at once (default: %(default)s; docker stop waits 10 s unless given -t)")
    p.add_argument("--max-stored-responses", type=non_negative_int, default=MAX_STORED_RESPONSES, metavar="N",
                   help="Responses API responses kept in memory for previous_response_id and GET /v1/responses/ID, "
                        "the most recently used first; 0 keeps none (default: %(default)s)")
    p.add_argument("--cors-origins", default="", help="comma-separated origins allowed by CORS")
    p.add_argument("--log-requests", action="store_true", help="log request bodies (prompts!)")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve GET /metrics (Prometheus) without the API keys, for a scraper in a trusted network")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="the access log's lines (one per request: id, route, status, tokens, time to first token, "
                        "duration; never prompt text): key=value text, or one JSON object each (default: %(default)s)")
    add_model_args(p)
    return p.parse_args(argv)


def lora_module(text: str) -> tuple[str, str]:
    """``--lora NAME=DIR`` (or ``DIR``, named after its folder) as (name, folder)."""
    name, sep, folder = text.partition("=")
    if not sep:
        name, folder = Path(text).expanduser().resolve().name, text
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (an adapter name and its folder), not {text!r}")
    return name, folder


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, not {text!r}")
    return int(text)


def default_max_model_len(config) -> int:
    """4x seq_length with dynamic NTK (the original's README shows flat perplexity out to there), else
    seq_length."""
    return 4 * config.seq_length if config.use_dynamic_ntk else config.seq_length


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.checkpoint_path and not args.demo:
        sys.exit(NO_CHECKPOINT)
    if args.api_auth and ":" not in args.api_auth:
        sys.exit("error: --api-auth takes user:password")
    if problem := port_problem(args.server_name, args.server_port):
        sys.exit(problem)  # before the model loads, which can take minutes
    with front_end_checkpoint(args) as (path, is_demo):
        serve(args, path, DEMO_NAME if is_demo else path.resolve().name)


def serve(args: argparse.Namespace, path: Path, default_name: str) -> None:
    """Load the model in `path` and serve it until the process is stopped."""
    import uvicorn

    from qwen.engine import Engine
    from qwen.lora import AdapterError, AdapterRegistry, enable_lora
    from qwen.serve.access_log import log_to_stderr
    from qwen.serve.app import create_app
    from qwen.serve.shutdown import DrainingServer

    logging.basicConfig(level=logging.INFO)
    log_to_stderr(args.log_format == "json")
    try:
        model, tokenizer = load_model(path, args)
    except (OSError, ValueError) as exc:
        sys.exit(f"error: cannot load {path}: {exc}")
    name = args.model_name or default_name
    adapters = None
    max_loras = max(args.max_loras, len(args.lora))
    if max_loras:
        adapters = AdapterRegistry(model, name, max_loras)
        for lora_name, folder in args.lora:
            try:
                adapters.load(lora_name, folder)
            except AdapterError as exc:
                sys.exit(f"error: --lora {lora_name}={folder}: {exc}")
        if args.compile:
            enable_lora(model)  # before compiling: an adapter loaded later then leaves the compiled graphs as they are
    try:
        engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size,
                        max_model_len=args.max_model_len or default_max_model_len(model.config), compile=args.compile,
                        prefix_cache_bytes=prefix_cache_bytes(args), prefill_chunk=args.prefill_chunk,
                        **engine_settings(args))
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if engine.prefix_cache is None and args.prefix_cache_gb:
        logging.info("prefix cache: off (window attention and the int8 KV cache keep keys that depend on more "
                     "than the tokens)")
    logging.info("context: %d tokens per request (prompt + output; the model's seq_length is %d%s)",
                 engine.max_model_len, model.config.seq_length,
                 ", dynamic NTK on" if model.config.use_dynamic_ntk else "")
    if args.compile:
        logging.info("compiling the decode step (torch.compile), a minute or more ...")
        started = time.perf_counter()
        engine.warm_up()
        logging.info("compiled in %.0f s", time.perf_counter() - started)
    app = create_app(
        engine,
        name,
        api_keys={k for k in args.api_keys.split(",") if k},
        basic_auth=args.api_auth,
        cors_origins=[o for o in args.cors_origins.split(",") if o],
        log_requests=args.log_requests,
        max_stored_responses=args.max_stored_responses,
        log_json=args.log_format == "json",
        metrics_public=args.metrics_public,
        max_queue=args.max_queue,
        adapters=adapters,
    )
    if args.disable_gc:
        gc.freeze()
        gc.disable()
    # qwen.serve.access_log writes one line per request with more in it than uvicorn's own access log
    config = uvicorn.Config(app, host=args.server_name, port=args.server_port, access_log=False,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, app, engine, args.shutdown_timeout).run()



if __name__ == "__main__":
    main()
