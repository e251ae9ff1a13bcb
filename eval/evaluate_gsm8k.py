"""GSM8K test, 8-shot chain of thought, base model, greedy."""

from qwen.eval.tasks import main_gsm8k

if __name__ == "__main__":
    main_gsm8k(chat=False)
