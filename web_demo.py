"""Browser chat with an original Qwen v1 checkpoint: python web_demo.py -c FOLDER (or --demo)."""

from qwen.apps.web import main

if __name__ == "__main__":
    main()
