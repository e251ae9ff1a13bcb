"""MMLU test, 5-shot, base model: the letter with the highest next-token probability (micro average)."""

from qwen.eval.tasks import main_multiple_choice

if __name__ == "__main__":
    main_multiple_choice("mmlu")
