"""Fine-tuning with transformers' Trainer: full, LoRA and Q-LoRA, optionally under DeepSpeed and torchrun.

``finetune/finetune.py`` runs :func:`main`; the scripts beside it hold the original recipes. The
arguments are those of the original ``finetune.py`` (``--model_name_or_path``, ``--data_path``,
``--eval_data_path``, ``--lazy_preprocess``, ``--model_max_length``, ``--use_lora``, ``--q_lora``,
``--lora_r/alpha/dropout/target_modules/bias``) plus every ``transformers.TrainingArguments`` flag.
The data format and label masking live in :mod:`qwen.finetune_data`.

Q-LoRA trains LoRA adapters on a 4-bit model: a GPTQ -Int4 checkpoint (as in the original; needs
the ``quant`` extra) or any unquantized checkpoint quantized at load time to bitsandbytes NF4
(runs on CPUs too). :func:`merge_lora` folds a LoRA adapter into its unquantized base.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from .finetune_data import DataError, make_supervised_data_module
from .library_notices import quiet_fine_tuning_notices

RECORD_FILE = "qwen_finetune.json"  # what finetune.py wrote into an output folder: method, base, quantization
REMOTE_CODE_SUFFIXES = (".py", ".cu", ".cpp")


class FinetuneError(RuntimeError):
    """A setting or input that cannot work; the message says why and what to do instead."""


quiet_fine_tuning_notices()  # before transformers' Trainer and peft import bitsandbytes and DeepSpeed


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen-7B", metadata={"help": "checkpoint folder to fine-tune"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "training data (JSON list of conversations)"})
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluation data, same format"})
    lazy_preprocess: bool = field(default=False, metadata={"help": "tokenize samples when first used"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(
        default=8192, metadata={"help": "longest sequence in tokens; longer samples are truncated (and counted)"}
    )
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    # Names of transformers 4 that the original scripts use; transformers 5 dropped them.
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "warm up over this fraction of the steps (sets --warmup_steps if that is 0)"}
    )
    evaluation_strategy: str | None = field(default=None, metadata={"help": "old name of --eval_strategy"})

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise FinetuneError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if not self.warmup_steps:
                self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None and str(self.eval_strategy) in ("no", "IntervalStrategy.NO"):
            self.eval_strategy = self.evaluation_strategy
        # transformers 5 renamed the original scripts' --gradient_checkpointing and warns on every run.
        if self.activation_checkpointing is None and self.gradient_checkpointing is not None:
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        super().__post_init__()


@dataclass
class LoraArguments:
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "w1", "w2"])
    lora_weight_path: str = field(default="", metadata={"help": "start from this trained adapter"})
    lora_bias: str = field(default="none", metadata={"help": "none, all or lora_only"})
    q_lora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit model (GPTQ checkpoint, else NF4)"})


def rank0_print(args: TrainingArguments | None, *values: Any) -> None:
    if args is None or args.process_index == 0:
        print(*values, flush=True)


# ----- checkpoint facts ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def checkpoint_quantization(path: str) -> dict | None:
    """The quantization_config of a checkpoint folder (config.json or quantize_config.json), or None."""
    folder = Path(path)
    config = _read_json(folder / "config.json") or {}
    if config.get("quantization_config"):
        return dict(config["quantization_config"])
    quantize_config = _read_json(folder / "quantize_config.json")
    if quantize_config:
        return {"quant_method": "gptq", **quantize_config}
    return None


def is_chat_checkpoint(path: str) -> bool:
    """Chat model (ChatML) or base model? The folder's generation_config.json says (chat_format
    'chatml' or 'raw'); without one, the original's rule: 'chat' in the name."""
    generation = _read_json(Path(path) / "generation_config.json")
    if generation and generation.get("chat_format"):
        return generation["chat_format"] == "chatml"
    return "chat" in str(path).lower()


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def deepspeed_zero_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of a --deepspeed value (file path, JSON text or dict), or None without DeepSpeed."""
    if not deepspeed:
        return None
    if isinstance(deepspeed, dict):
        config = deepspeed
    else:
        text = str(deepspeed)
        try:
            config = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
        except OSError as exc:
            raise FinetuneError(f"--deepspeed {text}: cannot read the DeepSpeed config ({exc.strerror})") from None
        except ValueError as exc:
            raise FinetuneError(f"--deepspeed {text} is not valid JSON: {exc}") from None
    return int(config.get("zero_optimization", {}).get("stage", 0) or 0)


def check_settings(args: Any) -> dict:
    """Refuse combinations that cannot work, before DeepSpeed starts or anything loads; return the plan.

    ``args`` has the fields of the four argument dataclasses (the parser's namespace).
    """
    path = args.model_name_or_path
    if not args.data_path:
        raise FinetuneError("--data_path is required (a JSON list of conversations; see finetune/sample_data.json)")
    use_lora = args.use_lora or args.q_lora
    if args.lora_bias not in ("none", "all", "lora_only"):
        raise FinetuneError(f"--lora_bias {args.lora_bias!r}: use none, all or lora_only")
    zero3 = deepspeed_zero_stage(args.deepspeed) == 3
    chat = is_chat_checkpoint(path)
    if args.q_lora and (zero3 or args.fsdp):
        raise FinetuneError(
            "Q-LoRA cannot run with DeepSpeed ZeRO-3 or FSDP: they shard the 4-bit weights, which cannot be "
            "partitioned. Use ZeRO-2 (finetune/ds_config_zero2.json) or no DeepSpeed."
        )
    if use_lora and not args.q_lora and zero3 and not chat:
        raise FinetuneError(
            "LoRA on a base model also trains the embedding and output layer (wte, lm_head), which ZeRO-3 cannot "
            "do with LoRA. Use ZeRO-2 (finetune/ds_config_zero2.json) or fine-tune a -Chat model."
        )
    quant = checkpoint_quantization(path) if os.path.isdir(path) else None
    if quant is not None:
        method = quant.get("quant_method", "gptq")
        bits = quant.get("bits", "?")
        if not args.q_lora:
            raise FinetuneError(
                f"{path} is a {bits}-bit {method} checkpoint: quantized weights can only be fine-tuned with "
                f"Q-LoRA (--use_lora --q_lora). For full or LoRA fine-tuning use the unquantized model."
            )
        if method != "gptq":
            raise FinetuneError(f"{path} is quantized with {method!r}; Q-LoRA supports GPTQ checkpoints only")
        missing = _missing("gptqmodel", "optimum")
        if missing:
            raise FinetuneError(
                f"Q-LoRA on the GPTQ checkpoint {path} needs the gptqmodel engine, and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'qwen[quant]' (needs "
                f"torch>=2.14.1). Or run Q-LoRA with bitsandbytes NF4 on the unquantized model (e.g. "
                f"Qwen-7B-Chat instead of Qwen-7B-Chat-Int4)."
            )
        quantization = "gptq"
    elif args.q_lora:
        if _missing("bitsandbytes"):
            raise FinetuneError("Q-LoRA with NF4 needs bitsandbytes: pip install 'qwen[finetune]'")
        quantization = "nf4"
    else:
        quantization = None
    if use_lora and _missing("peft"):
        raise FinetuneError("LoRA needs peft: pip install 'qwen[finetune]'")
    method = "q_lora" if args.q_lora else "lora" if use_lora else "full"
    return {"method": method, "chat": chat, "quantization": quantization, "zero3": zero3}


# ----- model --------------------------------------------------------------------------------------


def _half_dtype(training_args: TrainingArguments) -> torch.dtype | None:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return None


def load_model(model_args: ModelArguments, training_args: TrainingArguments, lora_args: LoraArguments, plan: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_args.model_name_or_path
    config = AutoConfig.from_pretrained(path, cache_dir=training_args.cache_dir)
    config.use_cache = False
    # The tokenizer names <|endoftext|> as eos; without it in the config, Trainer logs a mismatch every run.
    if config.eos_token_id is None:
        config.eos_token_id = 151643  # <|endoftext|>
    half = _half_dtype(training_args)
    on_cuda = torch.cuda.is_available() and not training_args.use_cpu
    kwargs: dict[str, Any] = {"config": config, "cache_dir": training_args.cache_dir}
    if plan["method"] == "full" and not training_args.deepspeed:
        # Without DeepSpeed nothing keeps fp32 master weights: train fp32 weights under autocast.
        kwargs["dtype"] = torch.float32
    else:
        kwargs["dtype"] = half or torch.float32
    if plan["quantization"] is not None:
        local_rank = int(os.environ.get("LOCAL_RANK") or 0)
        kwargs["device_map"] = {"": local_rank} if on_cuda else "cpu"
    if plan["quantization"] == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=half or torch.float32,
        )
    elif plan["quantization"] == "gptq":
        from transformers import GPTQConfig

        bits = int(checkpoint_quantization(path).get("bits", 4))
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend="auto_trainable")
        kwargs["dtype"] = torch.float16
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)

    if not training_args.use_lora:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    # Base models learn the ChatML markers' embeddings too (the original's rule); Q-LoRA keeps them frozen.
    modules_to_save = None if lora_args.q_lora or plan["chat"] else ["wte", "lm_head"]
    lora_config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        target_modules=lora_args.lora_target_modules,
        lora_dropout=lora_args.lora_dropout,
        bias=lora_args.lora_bias,
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save,
    )
    if lora_args.q_lora:
        # Freezing and casting only: the Trainer turns activation checkpointing on itself, under its new name
        # (peft would call the deprecated gradient_checkpointing_enable, which warns on every run).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if lora_args.lora_weight_path:
        model = PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config)
    if training_args.process_index == 0:
        model.print_trainable_parameters()
    if training_args.activation_checkpointing:
        model.enable_input_require_grads()
    return model


# ----- saving -------------------------------------------------------------------------------------


def copy_checkpoint_extras(src: str, dst: str) -> None:
    """Copy the generation config and the original remote-code files, so the output folder is a drop-in
    replacement of the original one (this package never executes those files)."""
    src_dir, dst_dir = Path(src), Path(dst)
    if not src_dir.is_dir():
        return
    for item in src_dir.iterdir():
        wanted = item.suffix in REMOTE_CODE_SUFFIXES or item.name == "generation_config.json"
        if item.is_file() and wanted and not (dst_dir / item.name).exists():
            shutil.copyfile(item, dst_dir / item.name)


def write_record(out: str, model_args: ModelArguments, plan: dict) -> None:
    record = {
        "method": plan["method"],
        "quantization": plan["quantization"],
        "chat": plan["chat"],
        "base_model": model_args.model_name_or_path,
    }
    Path(out, RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


# ----- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    """The four argument dataclasses and the plan. Settings are checked on the raw values first:
    building TrainingArguments already starts DeepSpeed and the process group."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    namespace, _ = parser.parse_known_args(args=argv)
    if os.path.isdir(namespace.model_name_or_path):  # adapters record their base: keep it valid from any cwd
        namespace.model_name_or_path = os.path.abspath(namespace.model_name_or_path)
    plan = check_settings(namespace)
    _single_process_env(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(args=argv)
    model_args.model_name_or_path = namespace.model_name_or_path
    if lora_args.q_lora and not training_args.use_lora:
        rank0_print(training_args, "note: --q_lora implies --use_lora")
        training_args.use_lora = True
    return model_args, data_args, training_args, lora_args, plan


def _single_process_env(argv: list[str]) -> None:
    """DeepSpeed without a launcher (the single-GPU Q-LoRA recipe runs plain ``python``) needs the
    variables torchrun would set; without them it looks for MPI."""
    if "RANK" in os.environ or not any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def train(argv: list[str] | None = None, callbacks: list | None = None):
    """Parse ``argv`` (default: the command line), train, save; return the Trainer."""
    model_args, data_args, training_args, lora_args, plan = parse_args(argv)
    path = model_args.model_name_or_path
    if not torch.cuda.is_available() or training_args.use_cpu:
        rank0_print(training_args, "note: no GPU in use: training on the CPU (fine for tiny models and tests)")

    from transformers import AutoTokenizer, Trainer

    # The tokenizer is saved with the model as it came (no model_max_length/padding overrides); the
    # data module truncates to --model_max_length and pads on the right itself.
    tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=training_args.cache_dir)
    data = make_supervised_data_module(
        tokenizer, data_args.data_path, data_args.eval_data_path, training_args.model_max_length,
        data_args.lazy_preprocess,
    )

    def report_truncation(final: bool) -> None:
        for name in ("train_dataset", "eval_dataset"):
            dataset = data[name]
            if dataset is None or (data_args.lazy_preprocess and not final):
                continue
            seen = "" if not data_args.lazy_preprocess else " (of those read)"
            rank0_print(
                training_args,
                f"truncation: {dataset.truncation.count} of {len(dataset)} {name.split('_')[0]} samples{seen} "
                f"were longer than --model_max_length {training_args.model_max_length} and were truncated",
            )

    report_truncation(final=False)
    # Seeded before the model is built: peft draws the LoRA A matrices (and a new wte/lm_head copy) from the
    # global generator, which the Trainer seeds only later; unseeded, two runs of one recipe trained apart.
    transformers.set_seed(training_args.seed)
    if training_args.deepspeed and not (torch.cuda.is_available() and not training_args.use_cpu):
        # On the CPU accelerate joins the processes with torch.distributed (gloo) but, unlike on GPUs, never tells
        # DeepSpeed: its ZeRO-3 model set-up would count one process and refuse the batch size of several nodes.
        import deepspeed

        _ = training_args.device  # the process group, set up by the training arguments
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    model = load_model(model_args, training_args, lora_args, plan)
    trainer = Trainer(model=model, processing_class=tokenizer, args=training_args, callbacks=callbacks, **data)
    if trainer.is_deepspeed_enabled:
        stage = training_args.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage", 0)
        rank0_print(training_args, f"DeepSpeed ZeRO-{stage} on {training_args.world_size} process(es)")
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"  # True: the newest checkpoint-* in output_dir
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_state()
    model.config.use_cache = True  # training ran without the KV cache; the saved model is for inference
    trainer.save_model(training_args.output_dir)
    if data_args.lazy_preprocess:
        report_truncation(final=True)
    if training_args.should_save:
        copy_checkpoint_extras(path, training_args.output_dir)
        write_record(training_args.output_dir, model_args, plan)
        what = "LoRA adapter" if training_args.use_lora else "model"
        rank0_print(training_args, f"saved the {what} and tokenizer to {training_args.output_dir}")
    return trainer


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        train(argv)
    except (DataError, FinetuneError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


# ----- merging ------------------------------------------------------------------------------------


def merge_lora(adapter_dir: str, out_dir: str, base: str | None = None, max_shard_size: str = "2GB",
               dtype: str | None = None) -> Path:
    """Fold a LoRA adapter into its base model and save safetensors, tokenizer and generation config."""
    from peft import AutoPeftModelForCausalLM, PeftConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise FinetuneError(f"{adapter} has no adapter_config.json: it is not a LoRA adapter folder")
    peft_config = PeftConfig.from_pretrained(str(adapter))
    base_path = base or peft_config.base_model_name_or_path
    record = _read_json(adapter / RECORD_FILE) or {}
    quant = checkpoint_quantization(base_path) if base_path and os.path.isdir(base_path) else None
    if quant is not None:
        raise FinetuneError(
            f"the adapter's base {base_path} is a {quant.get('bits', 4)}-bit {quant.get('quant_method', 'gptq')} "
            f"model: a Q-LoRA adapter cannot be merged into 4-bit weights. Merge it into the unquantized base "
            f"instead: python finetune/merge_lora.py {adapter_dir} {out_dir} --base PATH_TO_UNQUANTIZED_MODEL "
            f"(e.g. Qwen-7B-Chat for Qwen-7B-Chat-Int4)."
        )
    if record.get("quantization") == "nf4":
        print(f"note: merging a Q-LoRA (NF4) adapter into the unquantized weights of {base_path}")
    kwargs: dict[str, Any] = {}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    if base:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), str(adapter))
    else:
        model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), **kwargs)
    merged = model.merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.config.use_cache = True
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer_src = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base_path)
    AutoTokenizer.from_pretrained(str(tokenizer_src)).save_pretrained(out)
    for src in (adapter, Path(base_path)):
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
            break
    copy_checkpoint_extras(base_path, str(out))
    return out
