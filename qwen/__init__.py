"""qwen: run, serve, fine-tune, quantize and evaluate Qwen v1 checkpoints on current transformers.

Importing the package registers the ``qwen`` model type with transformers' Auto classes, so
``AutoConfig``/``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained(folder)`` load an original
Qwen checkpoint folder with this package's classes and never execute the folder's own code.

That import takes seconds (torch and transformers). The front ends (``openai_api.py``, ``web_demo.py``,
``cli_demo.py``) parse their command line first, so that ``--help`` or a mistyped flag answers at once:
their ``__main__`` module sets ``QWEN_DEFER_IMPORTS = True`` before importing qwen, and they call
:func:`register_auto_classes` when they load a model. The console scripts that run them (``qwen-cli``,
``qwen-web``, ``qwen-serve``: see :mod:`qwen.entry_points`) defer the import too.
"""

import sys

from . import entry_points

# The release, read by pyproject.toml ([tool.setuptools.dynamic]); see CHANGELOG.md.
__version__ = "0.1.0"

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer", "register_auto_classes"]


def register_auto_classes() -> None:
    """Register the Qwen classes with transformers' Auto classes (again: a no-op)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto import tokenization_auto

    from .config import QWenConfig
    from .modeling import QWenLMHeadModel, QWenModel
    from .tokenizer import QWenTokenizer

    AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
    AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
    AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
    # The tokenizer is registered by class name only. Real folders name "QWenTokenizer" in
    # tokenizer_config.json next to a remote-code auto_map; transformers treats a class found by that
    # name outside its own package as explicit local code and uses it even with trust_remote_code=True.
    # AutoTokenizer.register(QWenConfig, ...) would instead make it prefer the folder's own code.
    tokenization_auto.REGISTERED_TOKENIZER_CLASSES[QWenTokenizer.__name__] = QWenTokenizer
    globals().update(QWenConfig=QWenConfig, QWenLMHeadModel=QWenLMHeadModel, QWenModel=QWenModel,
                     QWenTokenizer=QWenTokenizer)


def __getattr__(name: str):
    """The classes, where a front end deferred the import."""
    if name in __all__:
        register_auto_classes()
        return globals()[name]
    raise AttributeError(f"module 'qwen' has no attribute {name!r}")


if not (getattr(sys.modules.get("__main__"), "QWEN_DEFER_IMPORTS", False)
        or entry_points.running_script() in entry_points.DEFERRED_IMPORTS):
    register_auto_classes()
