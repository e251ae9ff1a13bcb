"""GSM8K test, 0-shot (or 4-shot with --use-fewshot), chat model, greedy."""

from qwen.eval.tasks import main_gsm8k

if __name__ == "__main__":
    main_gsm8k(chat=True)
