"""OpenAI-compatible API server for an original Qwen v1 checkpoint: python openai_api.py -c FOLDER."""

from qwen.serve.main import main

if __name__ == "__main__":
    main()
