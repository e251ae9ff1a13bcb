"""HumanEval, 0-shot instruction, chat model, greedy; pass@1 from the sandboxed tests."""

from qwen.eval.tasks import main_humaneval

if __name__ == "__main__":
    main_humaneval(chat=True)
