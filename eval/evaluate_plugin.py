"""ReAct tool use, chat model: tool selection, tool input ROUGE-L and false-positive rate."""

from pathlib import Path

from qwen.eval.tasks import main_plugin

if __name__ == "__main__":
    main_plugin(Path(__file__).parent / "data")
