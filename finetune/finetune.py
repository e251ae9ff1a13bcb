"""Fine-tune a Qwen v1 checkpoint: full, LoRA or Q-LoRA, with transformers' Trainer (DeepSpeed optional).

    python finetune/finetune.py --model_name_or_path Qwen-7B-Chat --data_path data.json \
        --output_dir output_qwen [--use_lora [--q_lora]] [any transformers.TrainingArguments flag]

The scripts beside this file hold the original recipes (finetune_ds.sh, finetune_lora_ds.sh,
finetune_lora_single_gpu.sh, finetune_qlora_ds.sh, finetune_qlora_single_gpu.sh). The work is done
by qwen.finetune (model, LoRA, saving) and qwen.finetune_data (data format and label masking).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwen.finetune import main  # noqa: E402

if __name__ == "__main__":
    main()
