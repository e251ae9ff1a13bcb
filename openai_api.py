"""OpenAI-compatible API server for an original Qwen v1 checkpoint: python openai_api.py -c FOLDER."""

QWEN_DEFER_IMPORTS = True  # parse the command line (--help answers at once) before importing torch

from qwen.serve.main import main  # noqa: E402

if __name__ == "__main__":
    main()
