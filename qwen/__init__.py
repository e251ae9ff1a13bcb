"""qwen: run, serve, fine-tune, quantize and evaluate Qwen v1 checkpoints on current transformers.

Importing the package registers the ``qwen`` model type with transformers' Auto classes, so
``AutoConfig``/``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained(folder)`` load an original
Qwen checkpoint folder with this package's classes and never execute the folder's own code.
"""

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

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer"]
