"""Many prompts at once: qwen's continuous-batching ``Engine``, and ``qwen.chat.batch_chat``.

    python examples/batch_inference.py -c Qwen-7B-Chat              # both
    python examples/batch_inference.py -c Qwen-7B-Chat engine       # or one of them
    python examples/batch_inference.py -c Qwen-7B-Chat batch-chat

``Engine`` is the serving path (the API server runs on it): requests join and leave the running
batch between decode steps, each with its own sampling settings; give it token ids. ``batch_chat``
is the original chat API for a list of conversations: one left-padded ``generate()`` call, each
reply equal to ``model.chat``'s for that conversation alone when decoding is greedy.
Both decode greedily here, so reruns print the same replies.
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

import qwen  # noqa: F401  (registers the Qwen classes)
from qwen.chat import DEFAULT_SYSTEM, batch_chat, make_context
from qwen.engine import Engine
from qwen.sampling import SamplingParams

QUERIES = ["Hello! Who are you?", "Write a haiku about autumn.", "What is the capital of France?"]


def engine_replies(model, tokenizer, queries: list[str], max_new_tokens: int) -> list[tuple[str, str]]:
    """(reply, finish reason) per query: chat prompts as ids, generated together on the engine."""
    engine = Engine(model, tokenizer, max_batch_size=len(queries))
    prompts = [make_context(tokenizer, query, system=DEFAULT_SYSTEM)[1] for query in queries]
    # A chat reply ends at <|im_end|>; <|im_start|> and <|endoftext|> also end it if a model writes them.
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False,
                            stop_token_ids=[tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id])
    # Sampling instead: SamplingParams(do_sample=True, top_p=0.8, seed=i) per prompt, as a list.
    return [(seq.text.strip(), seq.finish_reason) for seq in engine.generate(prompts, params)]


def batch_chat_replies(model, tokenizer, max_new_tokens: int) -> list[tuple[str, str]]:
    """(query, reply) for three conversations with their own histories and system messages."""
    queries = ["What is my name?", "Translate 'good morning' for me.", "Name three primary colours."]
    histories = [[("Hi, I am Ann.", "Nice to meet you, Ann!")], None, None]
    systems = [DEFAULT_SYSTEM, "You translate everything the user says into French.", DEFAULT_SYSTEM]
    results = batch_chat(model, tokenizer, queries, histories, systems, do_sample=False, max_new_tokens=max_new_tokens)
    return [(query, response) for query, (response, _history) in zip(queries, results, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint", required=True, help="a Qwen -Chat checkpoint folder")
    parser.add_argument("mode", nargs="?", choices=["both", "engine", "batch-chat"], default="both")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, device_map="auto").eval()
    if args.mode in ("both", "engine"):
        print("== Engine")
        for query, (reply, reason) in zip(QUERIES, engine_replies(model, tokenizer, QUERIES, args.max_new_tokens),
                                          strict=True):
            print(f"{query}\n    -> {reply!r} ({reason})")
    if args.mode in ("both", "batch-chat"):
        print("== batch_chat")
        for query, reply in batch_chat_replies(model, tokenizer, args.max_new_tokens):
            print(f"{query}\n    -> {reply!r}")


if __name__ == "__main__":
    main()
