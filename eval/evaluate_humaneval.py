"""HumanEval, 0-shot completion, base model, greedy; pass@1 from the sandboxed tests."""

from qwen.eval.tasks import main_humaneval

if __name__ == "__main__":
    main_humaneval(chat=False)
