"""Quantize a Qwen v1 checkpoint to GPTQ Int4/Int8 (the original script's flags); see qwen/gptq.py.

    python run_gptq.py --model_name_or_path Qwen-1_8B-Chat --data_path calib.json --out_path Qwen-1_8B-Chat-Int4 \
        --bits 4 --group-size 128 [--max_len 8192] [--desc_act] [--num_samples N] [--device cpu|cuda]
"""

from qwen.gptq import main

if __name__ == "__main__":
    main()
