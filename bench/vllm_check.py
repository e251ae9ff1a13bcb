"""vLLM serves a ``python -m qwen.export qwen2`` folder as we run the original: same prompt ids, same greedy replies.

    python bench/vllm_check.py [--tensor-parallel-size N] [--new-tokens 16]

On a CUDA machine with vLLM installed: a tiny random checkpoint in the original layout
(``qwen.tiny.make_tiny_checkpoint``; head_dim 64, which vLLM's attention kernels support) is exported
to a Qwen2 folder in bf16, loaded with offline ``vllm.LLM`` (no ``qwen`` and no remote code involved on
vLLM's side), and compared with our model on the same bf16 weights:

* prompt ids: vLLM's tokenizer (``generate``) and chat template (``chat``) give QWenTokenizer's and
  ``make_context``'s ids;
* greedy replies: equal to ours token for token, except that after a step where our fp32 logits have a
  near tie (the top two within 1% of the logit range) vLLM's bf16 kernels may pick the other one, from
  where the replies may part: reported, not a failure;
* the exported generation_config.json reaches vLLM's default sampling parameters (top_p, repetition
  penalty) and stop ids.

Without vLLM or without CUDA it prints "skipped: ..." and exits 0. Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

PROMPTS = ["Hello, world! The capital of France is", "你好，请介绍一下你自己。", "def fib(n):\n    "]
CHATS = [("Hello!", [], "You are a helpful assistant."),
         ("给这个故事起一个标题", [("讲一个故事", "从前有座山。")], "You are a helpful assistant.")]
NEAR_TIE = 0.01  # of the logit range


def skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0

    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from qwen.chat import make_context
    from qwen.export import export_qwen2
    from qwen.tiny import make_tiny_checkpoint
    from qwen.tokenizer import QWenTokenizer

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="qwen-vllm-") as temp:
        src = make_tiny_checkpoint(Path(temp) / "tiny-chat", layers=2, hidden=256, heads=4, intermediate=1024,
                                   seq_length=2048, initializer_range=0.05, dtype=torch.bfloat16)
        dst = Path(temp) / "tiny-chat-qwen2"
        # rope "none": vLLM reads the default "dynamic" as one fixed NTK base at every length, not exact below
        # seq_length (qwen.export.rope); prompts here stay far below it, where "none" is exact.
        for note in export_qwen2(src, dst, dtype="bf16", rope="none").notes:
            print(f"export: {note}")
        tokenizer = QWenTokenizer.from_pretrained(src)
        # ours: the same bf16 weights, computed in fp32 (the reference the near-tie rule reads)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to("cuda").eval()
        llm = LLM(model=str(dst), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3,
                  max_model_len=1024, tensor_parallel_size=args.tensor_parallel_size, seed=0)
        defaults = llm.get_default_sampling_params()
        print(f"vLLM default sampling from generation_config.json: top_p {defaults.top_p}, repetition_penalty "
              f"{defaults.repetition_penalty}, stop ids {sorted(defaults.stop_token_ids or [])}")
        if abs(defaults.top_p - 0.8) > 1e-6 or abs(defaults.repetition_penalty - 1.1) > 1e-6:
            failures.append("generation_config.json's top_p/repetition_penalty did not reach vLLM's defaults")
        greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, repetition_penalty=1.0)

        prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
        outputs = llm.generate(PROMPTS, greedy)
        chat_outputs = llm.chat([[{"role": "system", "content": s}]
                                 + [m for q_, r in h for m in ({"role": "user", "content": q_},
                                                                {"role": "assistant", "content": r})]
                                 + [{"role": "user", "content": q}] for q, h, s in CHATS], greedy)
        chat_ids = [make_context(tokenizer, q, h, system=s)[1] for q, h, s in CHATS]
        for label, expected, output in [*zip(PROMPTS, prompt_ids, outputs, strict=True),
                                        *zip([c[0] for c in CHATS], chat_ids, chat_outputs, strict=True)]:
            if list(output.prompt_token_ids) != expected:
                failures.append(f"{label!r}: vLLM's prompt ids differ from ours")
                continue
            theirs = list(output.outputs[0].token_ids)
            x = torch.tensor([expected], device="cuda")
            ours = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=args.new_tokens, repetition_penalty=1.0, eos_token_id=None,
                                  pad_token_id=151643)[0, len(expected):].tolist()
            at = first_divergence(ours, theirs)
            if at is None:
                print(f"ok   {label!r}: {len(theirs)} greedy tokens equal")
                continue
            with torch.no_grad():
                logits = model(torch.tensor([expected + ours[:at]], device="cuda")).logits[0, -1].float()
            gap = (logits.max() - logits[theirs[at]]).item()
            span = (logits.max() - logits.min()).item()
            if gap <= NEAR_TIE * span:
                print(f"ok   {label!r}: equal for {at} tokens, then a near tie (gap {gap:.4f} of {span:.2f})")
            else:
                failures.append(f"{label!r}: vLLM picked token {theirs[at]} at step {at}, {gap:.4f} below our "
                                f"best (logit range {span:.2f})")
    for failure in failures:
        print(f"FAILED {failure}")
    print("vllm check: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
