"""Fine-tuning end to end on tiny checkpoints, on the CPU: label masking, data errors, the original
scripts (LoRA, full with ZeRO-3, Q-LoRA NF4 with ZeRO-2, LoRA with ZeRO-2), merging, resuming, and
clear errors. The training tests memorise three short answers and check them with ``model.chat``.

The tiny checkpoints for training are made with ``initializer_range=0.3``: at hidden size 64 that
gives logits on the scale of a trained model's, so a frozen output layer (LoRA) can still become
confident. DeepSpeed compiles two CPU ops on its first run (~1-6 min, cached under $HOME).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen.finetune import FinetuneError, main, merge_lora
from qwen.finetune_data import (
    DEFAULT_SYSTEM,
    IGNORE_TOKEN_ID,
    DataCollatorForSupervisedDataset,
    DataError,
    LazySupervisedDataset,
    SupervisedDataset,
    encode_conversation,
    load_conversations,
    preprocess,
)
from qwen.quantization.gptq_load import gptqmodel_available
from qwen.serve.process import free_port
from qwen.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FT = ROOT / "finetune"
IM_START, IM_END, NL = 151644, 151645, 198
SYSTEM, USER, ASSISTANT = 8948, 872, 77091  # ids of the role names
IGN = IGNORE_TOKEN_ID

# Three answers to memorise; the second sample has two turns.
QA = [
    [("Who are you?", "I am Qwen.")],
    [("Capital of France?", "Paris."), ("And of Italy?", "Rome.")],
    [("What is 2 + 3?", "5")],
]
# Fast settings for memorising QA: one batch holds every sample, constant high learning rate.
MEMORISE = [
    "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1", "--lr_scheduler_type", "constant",
    "--warmup_ratio", "0", "--weight_decay", "0", "--logging_steps", "1", "--save_strategy", "no",
    "--model_max_length", "64", "--disable_tqdm", "True", "--gradient_checkpointing", "False",
]


def conversations(turns):
    return [m for q, a in turns for m in ({"from": "user", "value": q}, {"from": "assistant", "value": a})]


def write_data(path: Path, samples) -> Path:
    path.write_text(json.dumps(samples, indent=1))
    return path


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MASTER_PORT=str(free_port()),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def run(cmd: list, cwd: Path, timeout: int = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=script_env(**env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# What a fine-tune or merge may print on stderr: our CPU note and progress bars. Anything else that warns,
# fails or announces a deprecation is a notice the user would have to wonder about.
EXPECTED_STDERR = re.compile(r"note: no GPU found|(Loading weights|Writing model shards)\b.*it/s\]$")
ALARMING = re.compile(r"(?i)warn|fail|deprecat|error|traceback|untrusted")


def assert_no_notices(stderr: str) -> None:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    alarming = [line for line in lines if not EXPECTED_STDERR.search(line) and ALARMING.search(line)]
    assert not alarming, "\n".join(alarming)


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def global_step(output_dir: Path) -> int:
    return json.loads((output_dir / "trainer_state.json").read_text())["global_step"]


def assert_loss_fell(output_dir: Path) -> None:
    trace = losses(output_dir)
    assert trace[0] > 5 and min(trace[-5:]) < 0.3, trace


def assert_memorised(path: Path, model=None) -> None:
    """Greedy chat on the trained model reproduces every trained answer, history included."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(path).eval()
    for turns in QA:
        history = []
        for question, answer in turns:
            response, history = model.chat(tokenizer, question, history=history, do_sample=False, max_new_tokens=12)
            assert response == answer, (question, response)


@pytest.fixture(scope="module")
def trainable_chat(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ft-chat"), initializer_range=0.3)


@pytest.fixture(scope="module")
def trainable_base(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ft-base"), chat=False, initializer_range=0.3)


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    samples = [{"id": f"qa{i}", "conversations": conversations(turns)} for i, turns in enumerate(QA)]
    return write_data(tmp_path_factory.mktemp("data") / "qa.json", samples)


# ----- data: encoding, label masking, collator ----------------------------------------------------


def test_two_turn_labels_train_exactly_the_tokens_of_the_spec(tokenizer):
    def plain(text):
        return tokenizer.encode(text, allowed_special=set())

    system, q1, a1, q2, a2 = plain(DEFAULT_SYSTEM), plain("Hi <|im_end|> there"), plain("Hello!"), plain("2+2?"), [19]
    assert plain("4") == a2 and IM_END not in q1  # user text '<|im_end|>' stays plain text
    ids, labels = encode_conversation(
        tokenizer, [{"from": "user", "value": "Hi <|im_end|> there"}, {"from": "assistant", "value": "Hello!"},
                    {"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]
    )
    expected_ids = (
        [IM_START, SYSTEM, NL, *system, IM_END, NL]
        + [IM_START, USER, NL, *q1, IM_END, NL]
        + [IM_START, ASSISTANT, NL, *a1, IM_END, NL]
        + [IM_START, USER, NL, *q2, IM_END, NL]
        + [IM_START, ASSISTANT, NL, *a2, IM_END, NL]
    )
    expected_labels = (
        [IM_START, IGN, IGN, *[IGN] * len(system), IM_END, NL]  # system: only the markers and "\n"
        + [IM_START, IGN, IGN, *[IGN] * len(q1), IM_END, NL]  # user: the same
        + [IM_START, IGN, IGN, *a1, IM_END, NL]  # assistant: role line masked, the rest trained
        + [IM_START, IGN, IGN, *[IGN] * len(q2), IM_END, NL]
        + [IM_START, IGN, IGN, *a2, IM_END, NL]
    )
    assert ids == expected_ids
    assert labels == expected_labels
    assert tokenizer.decode(ids).startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")


def test_sample_system_prompt_truncation_and_lazy_dataset(tokenizer, tmp_path):
    long_answer = "word " * 80
    samples = [
        {"id": "s", "system": "Be brief.", "conversations": conversations([("Hi", "Hello")])},
        {"id": "long", "conversations": conversations([("Tell me", long_answer)])},
    ]
    path = write_data(tmp_path / "d.json", samples)
    eager = SupervisedDataset(load_conversations(path), tokenizer, max_len=48)
    lazy = LazySupervisedDataset(load_conversations(path), tokenizer, max_len=48)
    assert [eager[i] for i in range(2)] == [lazy[i] for i in range(2)]
    assert eager.truncation.count == lazy.truncation.count == 1
    ids = eager[0]["input_ids"]
    assert ids[:3 + len(tokenizer.encode("Be brief."))] == [IM_START, SYSTEM, NL, *tokenizer.encode("Be brief.")]
    assert len(eager[1]["input_ids"]) == len(eager[1]["labels"]) == 48


def test_collator_pads_on_the_right_with_eod_mask_0_and_ignored_labels():
    batch = DataCollatorForSupervisedDataset()([
        {"input_ids": [1, 2, 3], "labels": [IGN, 2, 3]},
        {"input_ids": [4], "labels": [4]},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 151643, 151643]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGN, 2, 3], [4, IGN, IGN]]
    assert batch["input_ids"].dtype == torch.long


def test_original_preprocess_signature(tokenizer):
    out = preprocess([conversations([("Hi", "Hello")]), conversations([("A longer question here", "Yes")])],
                     tokenizer, max_len=512)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    assert out["attention_mask"][0].sum() < out["attention_mask"].shape[1]  # padded to the longest, not to 512


def test_sample_data_file_is_valid(tokenizer):
    samples = load_conversations(FT / "sample_data.json")
    assert len(samples) >= 12
    assert any(len(s["conversations"]) >= 4 for s in samples)
    assert all(len(SupervisedDataset([s], tokenizer, 512)[0]["input_ids"]) < 100 for s in samples)


BAD_SAMPLES = [
    ("[1, 2", "is not valid JSON"),
    ('{"a": 1}', "holds a JSON dict; expected a list of samples"),
    ("[]", "holds no samples"),
    ('[{"id": "x", "conv": []}]', "sample 0 (id 'x') has no 'conversations' key"),
    ('[{"id": "x", "conversations": []}]', "sample 0 (id 'x'): 'conversations' is empty"),
    ('[{"conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]}]',
     "sample 0, message 1: unknown role 'gpt'; use 'user' or 'assistant'"),
    ('[{"conversations": [{"from": "system", "value": "s"}]}]', "put a system prompt in the sample's 'system' field"),
    ('[{"conversations": [{"from": "user", "value": 3}]}]', "sample 0, message 0: 'value' is a int, not a string"),
    ('[{"conversations": [{"from": "user"}]}]', "sample 0, message 0 has no 'value' key"),
    ('[{"conversations": [{"from": "user", "value": "q"}]}]', "sample 0 has no assistant message"),
    ('[{"system": 1, "conversations": []}]', "'conversations' is empty"),
    ('[{"system": 1, "conversations": [{"from": "user", "value": "q"}]}]', "'system' is a int, not a string"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SAMPLES)
def test_malformed_data_names_the_sample_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_json_lines_are_accepted(tmp_path):
    lines = [json.dumps({"id": i, "conversations": conversations([("q", "a")])}) for i in range(2)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert [s["id"] for s in load_conversations(path)] == [0, 1]


# ----- end to end through the scripts -------------------------------------------------------------


def test_lora_script_memorises_then_merges_and_chats(trainable_chat, qa_data, tmp_path):
    out = tmp_path / "lora"
    proc = run(
        ["bash", FT / "finetune_lora_single_gpu.sh", "-m", trainable_chat, "-d", qa_data, "--output_dir", out,
         *MEMORISE, "--max_steps", "60", "--learning_rate", "2e-2",
         "--eval_data_path", qa_data, "--eval_strategy", "steps", "--eval_steps", "15"],
        cwd=tmp_path,
    )
    if not torch.cuda.is_available():
        assert "no GPU found" in proc.stderr
    assert_no_notices(proc.stderr)
    assert "truncation: 0 of 3 train samples" in proc.stdout
    assert_loss_fell(out)
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("eval_loss" in h for h in state["log_history"])
    # Only the adapter is saved (chat model: no wte/lm_head copies), with tokenizer and generation config.
    assert {"adapter_config.json", "adapter_model.safetensors", "qwen.tiktoken", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("model*.safetensors"))
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None

    merged = tmp_path / "merged"
    assert_no_notices(run([sys.executable, FT / "merge_lora.py", out, merged, "--max-shard-size", "30MB"],
                          cwd=tmp_path).stderr)
    assert (merged / "model.safetensors.index.json").is_file() and len(list(merged.glob("model-*.safetensors"))) > 1
    assert_memorised(merged)

    # Served without merging: the server's "mine" answers as the merged model, its base name as the base model.
    import openai

    from qwen.serve.process import ServerProcess

    with ServerProcess(trainable_chat, "--lora", f"mine={out}", command=[sys.executable, "openai_api.py"],
                       cwd=ROOT) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        for turns in QA:
            messages = []
            for question, answer in turns:
                messages.append({"role": "user", "content": question})
                reply = client.chat.completions.create(model="mine", messages=messages, temperature=0,
                                                       max_tokens=12).choices[0].message.content
                assert reply == answer, (question, reply)
                messages.append({"role": "assistant", "content": reply})
        base_reply = client.chat.completions.create(model=trainable_chat.name, temperature=0, max_tokens=12,
                                                    messages=[{"role": "user", "content": "Who are you?"}])
        assert base_reply.choices[0].message.content != "I am Qwen."

    # The adapter also loads with peft's AutoPeftModelForCausalLM (after `import qwen`) and agrees with the merge.
    from peft import AutoPeftModelForCausalLM

    ids = torch.tensor([[IM_START, USER, NL, 9707, IM_END, NL]])
    with torch.no_grad():
        adapter_logits = AutoPeftModelForCausalLM.from_pretrained(out).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True).eval()(ids).logits
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)


def test_two_runs_of_one_recipe_train_the_same_adapter(trainable_chat, qa_data, tmp_path):
    """peft draws the LoRA A matrices from the global generator: seeded before the model is built, two runs
    give the same bytes (unseeded, one run in several memorised too little and the LoRA test failed)."""
    procs = [subprocess.Popen(
        [str(c) for c in ["bash", FT / "finetune_lora_single_gpu.sh", "-m", trainable_chat, "-d", qa_data,
                          "--output_dir", tmp_path / f"run{i}", *MEMORISE, "--max_steps", "2"]],
        cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    for proc in procs:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
    adapters = [(tmp_path / f"run{i}" / "adapter_model.safetensors").read_bytes() for i in (1, 2)]
    assert adapters[0] == adapters[1]


def test_full_finetune_with_zero3_memorises(trainable_chat, qa_data, tmp_path):
    out = tmp_path / "full"
    proc = run(
        ["bash", FT / "finetune_ds.sh", "-m", trainable_chat, "-d", qa_data, "--output_dir", out,
         *MEMORISE, "--max_steps", "20", "--learning_rate", "5e-3"],
        cwd=tmp_path, GPUS_PER_NODE="0",
    )
    assert "DeepSpeed ZeRO-3 on 1 process(es)" in proc.stdout
    assert_loss_fell(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text())["chat_format"] == "chatml"
    assert (out / "modeling_qwen.py").is_file()  # the original's remote-code files travel along (never run)
    assert_memorised(out)


@pytest.mark.multinode
def test_two_nodes_train_one_model_with_zero3(trainable_chat, qa_data, tmp_path):
    """Two "nodes" on this machine, as the README's multi-node recipe runs them on two: finetune_ds.sh launched twice
    with NNODES=2, NODE_RANK 0 and 1 and MASTER_ADDR, DeepSpeed ZeRO-3 over gloo on the CPU. They train one model
    (rank 0 reports 2 processes and saves it), it has learnt, and neither prints a notice the user cannot act on."""
    nodes = dict(GPUS_PER_NODE="0", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                 OMP_NUM_THREADS="1")
    logs = [(tmp_path / f"node{rank}.out", tmp_path / f"node{rank}.err") for rank in (0, 1)]
    launches = []
    for rank, (out, err) in enumerate(logs):  # files, not pipes: a full pipe would stall its node, and both with it
        with open(out, "w") as stdout, open(err, "w") as stderr:
            launches.append(subprocess.Popen(
                [str(c) for c in ["bash", FT / "finetune_ds.sh", "-m", trainable_chat, "-d", qa_data, "--output_dir",
                                  tmp_path / f"node{rank}", *MEMORISE, "--max_steps", "20", "--learning_rate", "5e-3"]],
                cwd=tmp_path, env=script_env(**nodes, NODE_RANK=str(rank)), stdout=stdout, stderr=stderr,
                start_new_session=True))
    try:
        for launch, (out, err) in zip(launches, logs, strict=True):
            assert launch.wait(timeout=480) == 0, f"{out.read_text()[-3000:]}\n{err.read_text()[-5000:]}"
            assert_no_notices(err.read_text())
    finally:  # the launcher and its workers, should one node have failed while the other waits for it
        for launch in launches:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launch.pid, signal.SIGKILL)
    assert "DeepSpeed ZeRO-3 on 2 process(es)" in logs[0][0].read_text()
    assert not (tmp_path / "node1").exists()  # rank 0 saves the model, gathered from both
    assert_loss_fell(tmp_path / "node0")
    assert_memorised(tmp_path / "node0")


def test_qlora_nf4_script_memorises(trainable_chat, qa_data, tmp_path):
    out = tmp_path / "qlora"
    proc = run(
        ["bash", FT / "finetune_qlora_single_gpu.sh", "-m", trainable_chat, "-d", qa_data, "--output_dir", out,
         *MEMORISE, "--max_steps", "40", "--learning_rate", "2e-2",
         # As the script's defaults: activation checkpointing, and accumulation (2 batches of 2 hold the 3 samples)
         "--gradient_checkpointing", "True", "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "2"],
        cwd=tmp_path, GPUS_PER_NODE="0",
    )
    assert "DeepSpeed ZeRO-2 on 1 process(es)" in proc.stdout
    assert_no_notices(proc.stderr)
    assert json.loads((out / "qwen_finetune.json").read_text())["quantization"] == "nf4"
    assert_loss_fell(out)
    # The adapter answers on the 4-bit model it was trained on.
    from peft import AutoPeftModelForCausalLM
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoPeftModelForCausalLM.from_pretrained(out, quantization_config=nf4, device_map="cpu").eval()
    assert type(model.base_model.model.transformer.h[0].attn.c_attn.base_layer).__name__ == "Linear4bit"
    assert_memorised(out, model)
    # Merging goes into the unquantized base (not the 4-bit weights): a complete model folder. Its answers
    # may differ slightly from the 4-bit model's, so they are not compared.
    merged = merge_lora(str(out), str(tmp_path / "merged"))
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "qwen"


@pytest.mark.skipif(not gptqmodel_available(), reason="Q-LoRA on a GPTQ folder trains through gptqmodel + optimum "
                    "(the quant extra), which are not installed")
def test_qlora_on_a_gptq_folder_serves_unmerged_as_trained(qa_data, tmp_path):
    """The original's Q-LoRA path: an -Int4 GPTQ folder (here run_gptq.py's of a tiny model), Q-LoRA through
    gptqmodel, then openai_api.py --int4 --lora serves the adapter on those 4-bit weights (qwen's int4 kernel):
    each reply is the trained model's (peft over gptqmodel's layers), which no merge could give."""
    import openai
    from peft import AutoPeftModelForCausalLM

    from qwen.serve.process import ServerProcess

    source = make_tiny_checkpoint(tmp_path / "fp32", initializer_range=0.3, hidden=128, heads=4, intermediate=512)
    gptq, out = tmp_path / "int4", tmp_path / "qlora"
    run([sys.executable, ROOT / "run_gptq.py", "--model_name_or_path", source, "--data_path", qa_data, "--out_path",
         gptq, "--bits", "4", "--group-size", "128", "--device", "cpu", "--max_len", "512"], cwd=tmp_path)
    run(["bash", FT / "finetune_qlora_single_gpu.sh", "-m", gptq, "-d", qa_data, "--output_dir", out, *MEMORISE,
         "--max_steps", "40", "--learning_rate", "2e-2"], cwd=tmp_path, GPUS_PER_NODE="0", GPTQMODEL_CPU_WORKERS="2")
    assert json.loads((out / "qwen_finetune.json").read_text())["quantization"] == "gptq"
    tokenizer = AutoTokenizer.from_pretrained(gptq)
    trained = AutoPeftModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    questions = [q for turns in QA for q, _ in turns[:1]]
    expected = [trained.chat(tokenizer, q, history=None, do_sample=False, max_new_tokens=12)[0] for q in questions]
    assert "I am Qwen." in expected  # it learned
    with ServerProcess(gptq, "--int4", "--lora", f"mine={out}", command=[sys.executable, "openai_api.py"],
                       cwd=ROOT) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        replies = [client.chat.completions.create(model="mine", messages=[{"role": "user", "content": q}],
                                                  temperature=0, max_tokens=12).choices[0].message.content
                   for q in questions]
    assert replies == expected


def test_lora_deepspeed_zero2_with_one_cpu_process(trainable_base, tmp_path, tokenizer):
    """A base model: LoRA also trains wte and lm_head (modules_to_save); over-long samples are counted."""
    out = tmp_path / "lora-ds"
    expected = SupervisedDataset(load_conversations(FT / "sample_data.json"), tokenizer, 40).truncation.count
    assert expected > 0
    proc = run(
        ["bash", FT / "finetune_lora_ds.sh", "-m", trainable_base, "-d", FT / "sample_data.json",
         "--output_dir", out, "--max_steps", "2", "--gradient_accumulation_steps", "2", "--model_max_length", "40",
         "--lazy_preprocess", "False", "--save_strategy", "no", "--disable_tqdm", "True"],
        cwd=tmp_path, GPUS_PER_NODE="0",
    )
    assert "DeepSpeed ZeRO-2 on 1 process(es)" in proc.stdout
    assert f"truncation: {expected} of 12 train samples were longer than --model_max_length 40" in proc.stdout
    assert global_step(out) == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["modules_to_save"]) == ["lm_head", "wte"]
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        trained = {k: f.get_tensor(k) for k in f.keys() if "wte" in k or "lm_head" in k}
    wte = next(t for k, t in trained.items() if "wte" in k)
    # Merging puts the trained embedding (and output layer) into the model.
    merged = AutoModelForCausalLM.from_pretrained(merge_lora(str(out), str(tmp_path / "merged")))
    assert torch.equal(merged.transformer.wte.weight, wte)
    assert not torch.equal(wte, AutoModelForCausalLM.from_pretrained(trainable_base).transformer.wte.weight)
    assert len(trained) == 2


def test_resume_from_checkpoint_continues_where_it_stopped(trainable_chat, qa_data, tmp_path):
    common = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_steps", "4",
              "--save_steps", "2", "--learning_rate", "1e-2", "--model_max_length", "64", "--disable_tqdm", "True",
              "--gradient_checkpointing", "False", "--lora_r", "8", "--lora_target_modules", "c_attn", "w2"]
    script = ["bash", FT / "finetune_lora_single_gpu.sh", "-m", trainable_chat, "-d", qa_data]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run([*script, "--output_dir", whole, *common], cwd=tmp_path, GPUS_PER_NODE="0")
    assert {p.name for p in whole.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    # A run that died after its first checkpoint: only checkpoint-2 exists. Rerun with the same flags.
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    run([*script, "--output_dir", resumed, *common, "--resume_from_checkpoint", "True"], cwd=tmp_path,
        GPUS_PER_NODE="0")
    assert global_step(resumed) == global_step(whole) == 4
    adapter = json.loads((resumed / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and sorted(adapter["target_modules"]) == ["c_attn", "w2"]
    # Same data order, dropout and optimizer state: the steps after the checkpoint repeat exactly.
    assert losses(resumed) == pytest.approx(losses(whole), rel=1e-5)


# ----- clear errors -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_role_data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("bad") / "bad_role.json", [
        {"id": "ok", "conversations": conversations([("q", "a")])},
        {"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
    ])


def test_errors_in_a_subprocess_are_one_clear_line_without_traceback(trainable_chat, qa_data, bad_role_data,
                                                                       tmp_path):
    """A data error through a script, a settings error through finetune.py: exit status 1, a message on
    stderr, no traceback. Both start at once (each pays the same import time)."""
    commands = {
        "sample 1 (id 'b'), message 0: unknown role 'human'; use 'user' or 'assistant'": [
            "bash", FT / "finetune_lora_single_gpu.sh", "-m", trainable_chat, "-d", bad_role_data,
            "--output_dir", tmp_path / "out1"],
        "Q-LoRA cannot run with DeepSpeed ZeRO-3": [
            sys.executable, FT / "finetune.py", "--model_name_or_path", trainable_chat, "--data_path", qa_data,
            "--output_dir", tmp_path / "out2", "--use_lora", "--q_lora", "--deepspeed", FT / "ds_config_zero3.json"],
    }
    procs = {
        message: subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=script_env(GPUS_PER_NODE="0"), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for message, cmd in commands.items()
    }
    for message, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 1, (stdout[-2000:], stderr[-3000:])
        assert "error: " in stderr and message in stderr, stderr[-3000:]
        assert "Traceback" not in stderr
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


@pytest.mark.parametrize(("case", "message"), [
    ("empty conversations", "sample 0 (id 'e'): 'conversations' is empty"),
    ("lora zero3 base", "LoRA on a base model also trains the embedding and output layer (wte, lm_head)"),
    ("no data", "--data_path is required"),
    ("bad deepspeed config", "cannot read the DeepSpeed config"),
])
def test_errors_in_process(trainable_chat, trainable_base, qa_data, tmp_path, capsys, case, message):
    empty = write_data(tmp_path / "empty.json", [{"id": "e", "conversations": []}])
    common = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "True"]
    argv = {
        "empty conversations": ["--model_name_or_path", str(trainable_chat), "--data_path", str(empty)],
        "lora zero3 base": ["--model_name_or_path", str(trainable_base), "--data_path", str(qa_data), "--use_lora",
                            "--deepspeed", str(FT / "ds_config_zero3.json")],
        "no data": ["--model_name_or_path", str(trainable_chat)],
        "bad deepspeed config": ["--model_name_or_path", str(trainable_chat), "--data_path", str(qa_data),
                                 "--deepspeed", str(tmp_path / "missing.json")],
    }[case]
    rank = os.environ.get("RANK")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *common])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert os.environ.get("RANK") == rank  # refused before DeepSpeed's environment was set up


def test_gptq_checkpoint_without_engine_names_the_quant_extra(trainable_chat, qa_data, tmp_path, capsys):
    gptq = tmp_path / "int4"
    shutil.copytree(trainable_chat, gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                     "sym": True}
    (gptq / "config.json").write_text(json.dumps(config))
    import importlib.util

    argv = ["--model_name_or_path", str(gptq), "--data_path", str(qa_data), "--output_dir", str(tmp_path / "o"),
            "--use_cpu", "True"]
    if importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--use_lora", "--q_lora"])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert "needs the gptqmodel engine" in err and "pip install 'qwen[quant]'" in err
    # Full or plain-LoRA fine-tuning of quantized weights is refused whatever is installed.
    with pytest.raises(SystemExit):
        main([*argv, "--use_lora"])
    assert "can only be fine-tuned with Q-LoRA" in capsys.readouterr().err

    # A Q-LoRA adapter of a GPTQ model cannot be merged into it: the error points at the unquantized base.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(gptq), "task_type": "CAUSAL_LM", "r": 8,
        "target_modules": ["c_attn"],
    }))
    with pytest.raises(FinetuneError, match="cannot be merged into 4-bit weights. Merge it into the unquantized base"):
        merge_lora(str(adapter), str(tmp_path / "merged"))


def test_script_help(tmp_path):
    proc = run(["bash", FT / "finetune_lora_single_gpu.sh", "-h"], cwd=tmp_path)
    assert "Usage: bash finetune/finetune_lora_single_gpu.sh [-m MODEL_PATH] [-d DATA_PATH]" in proc.stdout
