"""Terminal chat with an original Qwen v1 checkpoint: python cli_demo.py -c FOLDER (or --demo)."""

from qwen.apps.cli import main

if __name__ == "__main__":
    main()
