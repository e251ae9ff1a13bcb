"""Export Qwen v1 checkpoints for other runtimes: a ``Qwen2ForCausalLM`` folder (plain transformers, vLLM,
SGLang, TGI; no ``qwen`` and no remote code needed to load it) or a GGUF file (llama.cpp).

    python -m qwen.export qwen2 SRC DST [--dtype bf16] [--shard-size 5GB] [--rope-scaling dynamic]
    python -m qwen.export gguf SRC DST.gguf [--outtype bf16|q8_0]

Modules: ``source`` reads and checks the original folder, ``staging`` writes beside DST and renames,
``qwen2`` and ``gguf_file`` write the two formats, ``tokenizer_json`` builds the fast tokenizer, ``rope``
chooses the long-context rotary setting.
"""

from .gguf_file import export_gguf
from .qwen2 import export_qwen2
from .source import ExportError, ExportReport

__all__ = ["ExportError", "ExportReport", "export_gguf", "export_qwen2"]
