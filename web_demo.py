"""Browser chat with an original Qwen v1 checkpoint: python web_demo.py -c FOLDER (or --demo)."""

QWEN_DEFER_IMPORTS = True  # parse the command line (--help answers at once) before importing torch

from qwen.apps.web import main  # noqa: E402

if __name__ == "__main__":
    main()
