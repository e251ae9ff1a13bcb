"""C-Eval val, 0-shot, chat model: the answer letter extracted from the reply."""

from qwen.eval.tasks import main_chat_multiple_choice

if __name__ == "__main__":
    main_chat_multiple_choice("ceval")
