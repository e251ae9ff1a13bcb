"""LoRA adapters served unmerged (qwen.lora): the same outputs as the merged model, per row of a batch, on
float, int8, int4 and GPTQ bases, through the engine (prefix cache, compiled step) and the real server, and
clear errors for folders that cannot serve. The adapters are peft's own, made with random (non-zero) weights."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qwen.engine import Engine
from qwen.lora import AdapterError, AdapterRegistry, load_lora, row_groups, use_lora
from qwen.quantization import quantize_int4_, quantize_int8_
from qwen.sampling import SamplingParams
from qwen.serve.process import ServerProcess
from qwen.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHAT_TARGETS = ["c_attn", "c_proj", "w1", "w2"]  # finetune.py's default


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False)


def make_adapter(base: Path, out: Path, targets: list[str], modules_to_save: list[str] | None = None,
                 r: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A peft LoRA folder for ``base`` with random weights (B too, unlike a fresh fine-tune's zeros), and the
    model it merges into (peft's merge_and_unload)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=modules_to_save,
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:  # a fine-tuned copy of wte / lm_head
                param.add_(torch.randn_like(param) * 0.05)
            elif "lora_" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(out)
    return out, peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lora-base"), initializer_range=0.3, seed=3)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name: (folder, merged model): a chat LoRA; a base-model LoRA with its own wte and lm_head (finetune.py's
    modules_to_save); one on the embedding and lm_head themselves."""
    root = tmp_path_factory.mktemp("lora-adapters")
    return {
        "chat": make_adapter(base, root / "chat", CHAT_TARGETS, seed=1),
        "chat2": make_adapter(base, root / "chat2", ["c_attn", "w2"], r=8, seed=2),
        "saved": make_adapter(base, root / "saved", CHAT_TARGETS, modules_to_save=["wte", "lm_head"], seed=3),
        "embed": make_adapter(base, root / "embed", ["wte", "lm_head", "c_proj"], seed=4),
    }


def fresh(base: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()


PROMPTS = [[151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198],
           [785, 6722, 315, 9625, 374], [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]


@pytest.mark.parametrize("kind", ["chat", "saved", "embed"])
def test_unmerged_logits_are_the_merged_models(base, adapters, kind):
    folder, merged = adapters[kind]
    model = fresh(base)
    ids = torch.tensor([PROMPTS[2], PROMPTS[2][::-1]])
    with torch.no_grad():
        before = model(ids).logits
        adapter = load_lora(model, folder)
        with use_lora(adapter):
            ours = model(ids).logits
        # Row 1 with the adapter, row 0 without, in one batch.
        with use_lora(row_groups([None, adapter], ids.device)):
            mixed = model(ids).logits
        after = model(ids).logits  # outside use_lora: the base model, as before loading
        expected = merged(ids).logits
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], expected[1], atol=2e-4, rtol=1e-4)
    assert torch.equal(mixed[0], before[0]) and torch.equal(after, before)
    assert not torch.allclose(before, expected, atol=1e-2)  # the adapter does change the model
    assert adapter.name == kind and adapter.rank == 4


def assert_greedy(model, prompt: list[int], tokens: list[int], margin: float = 1e-3) -> None:
    """``tokens`` are ``model``'s greedy continuation of ``prompt``: at each step the chosen token's logit is the
    highest, or within ``margin`` of it (fp32 rounding may break a near-tie of a random model either way)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1].float()
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert (logits.max(-1).values - chosen).max().item() <= margin, (chosen, logits.max(-1))


def engine_tokens(model, tokenizer, prompts, adapters=None, **kwargs) -> list[list[int]]:
    engine = Engine(model, tokenizer, max_batch_size=4, **kwargs)
    return [s.output_ids for s in engine.generate(prompts, greedy(), adapters)]


def test_a_batch_of_rows_on_different_adapters_decodes_as_each_merged_model(base, adapters, tokenizer):
    """Through the engine, 6 requests on 2 adapters and the base model, 4 at a time (rows join and leave): each
    gets its merged model's greedy tokens. fp32, so the same tokens exactly."""
    model = fresh(base)
    chat, chat2 = (load_lora(model, adapters[k][0]) for k in ("chat", "chat2"))
    work = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    which = [chat, None, chat2, chat2, chat, None]
    got = engine_tokens(model, tokenizer, work, which)
    merged = {None: fresh(base), chat: adapters["chat"][1], chat2: adapters["chat2"][1]}
    for prompt, adapter, tokens in zip(work, which, got, strict=True):
        assert_greedy(merged[adapter], prompt, tokens)
    assert got[0] != got[3]  # the two adapters answer the same prompt differently


def test_base_model_lora_with_its_own_embeddings_through_the_engine(base, adapters, tokenizer):
    """finetune.py on a base model saves whole wte and lm_head copies: rows with the adapter use them."""
    model = fresh(base)
    saved = load_lora(model, adapters["saved"][0])
    assert set(saved.replaced) == {"transformer.wte", "lm_head"}
    got = engine_tokens(model, tokenizer, PROMPTS, [saved, None, saved])
    assert_greedy(adapters["saved"][1], PROMPTS[0], got[0])
    assert_greedy(adapters["saved"][1], PROMPTS[2], got[2])
    assert got[1] == engine_tokens(fresh(base), tokenizer, [PROMPTS[1]])[0]


def test_bf16_unmerged_is_the_merged_model_within_bf16_noise(base, adapters, tokenizer, tmp_path):
    folder, _ = make_adapter(base, tmp_path / "a", CHAT_TARGETS, seed=5)
    merged = make_adapter(base, tmp_path / "b", CHAT_TARGETS, seed=5, dtype=torch.bfloat16)[1]
    model = fresh(base, torch.bfloat16)
    adapter = load_lora(model, folder)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad(), use_lora(adapter):
        ours = model(ids).logits.float()
    with torch.no_grad():
        expected, plain = merged(ids).logits.float(), model(ids).logits.float()
        bf16_noise = (plain - fresh(base)(ids).logits).abs().max().item()  # the base model's own, bf16 vs fp32
    assert (ours - expected).abs().max().item() <= 2 * bf16_noise


def quantized_pair(base: Path, quantize):
    """A quantized model and its float twin whose weights are the quantized layers dequantized."""
    model = quantize(fresh(base, torch.bfloat16))
    twin = fresh(base)
    for name, module in model.named_modules():
        if hasattr(module, "dequantize") and hasattr(module, "bits"):
            twin.get_submodule(name).weight.data = module.dequantize(dtype=torch.float32)
    return model, twin


@pytest.mark.parametrize("quantize", [quantize_int8_, quantize_int4_], ids=["int8", "int4"])
def test_adapter_runs_beside_quantized_layers(base, adapters, quantize):
    """On --int8 / --int4 layers the adapter adds its update to the quantized layer's output: the result is as far
    from the dequantized base plus the adapter as the quantized base is from the dequantized one."""
    model, twin = quantized_pair(base, quantize)
    folder = adapters["chat"][0]
    adapter, twin_adapter = load_lora(model, folder), load_lora(twin, folder)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        base_gap = (model(ids).logits.float() - twin(ids).logits).abs().max().item()
        with use_lora(adapter):
            ours = model(ids).logits.float()
        with use_lora(twin_adapter):
            reference = twin(ids).logits
        plain = twin(ids).logits
    gap = (ours - reference).abs().max().item()
    assert gap < 2 * base_gap + 0.05
    assert gap < 0.2 * (plain - reference).abs().max().item()


# ----- errors -------------------------------------------------------------------------------------


def damaged(folder: Path, tmp_path: Path, config: dict | None = None, tensors=None) -> Path:
    out = tmp_path / "bad"
    out.mkdir(exist_ok=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    weights = load_file(folder / "adapter_model.safetensors")
    if tensors is not None:
        weights = tensors(weights)
    if weights is not None:
        save_file(weights, out / "adapter_model.safetensors")
    return out


def first_key(weights: dict, part: str) -> str:
    return next(k for k in sorted(weights) if part in k)


CASES = {
    "missing folder": (lambda f, t: t / "nowhere", "does not exist"),
    "no config": (lambda f, t: (t / "empty").mkdir() or t / "empty", "has no adapter_config.json"),
    "no weights": (lambda f, t: damaged(f, t, tensors=lambda w: None), "no adapter_model.safetensors"),
    "not LoRA": (lambda f, t: damaged(f, t, {"peft_type": "IA3"}), "holds a IA3 adapter"),
    "DoRA": (lambda f, t: damaged(f, t, {"use_dora": True}), "use_dora=True, which qwen does not implement"),
    "config rank": (lambda f, t: damaged(f, t, {"r": 16}), "gives transformer.h.0.attn.c_attn rank 16, its weights"),
    "half a pair": (lambda f, t: damaged(f, t, tensors=lambda w: {k: v for k, v in w.items() if "h.1.mlp.w1.lora_B"
                                                                  not in k}), "has only lora_A"),
    "wider base": (lambda f, t: damaged(f, t, tensors=lambda w: {k: torch.zeros(4, 128) if k == first_key(
        w, "c_attn.lora_A") else v for k, v in w.items()}), "maps 128 -> 192 channels in the adapter but 64 -> 192"),
    "more layers": (lambda f, t: damaged(f, t, tensors=lambda w: {**w, **{k.replace(".h.0.", ".h.7."): v.clone()
                                                                          for k, v in w.items() if ".h.0." in k}}),
                    "transformer.h.7.attn.c_attn, which this model lacks; this model has 2 layers"),
    "other architecture": (lambda f, t: damaged(f, t, tensors=lambda w: {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}),
        "belongs to another model architecture"),
    "damaged file": (lambda f, t: damaged(f, t) and (t / "bad" / "adapter_model.safetensors").write_bytes(b"xx")
                     and t / "bad", "cannot be read"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_folder_that_cannot_serve_is_a_clear_error(base, adapters, tmp_path, case):
    make, message = CASES[case]
    folder = make(adapters["chat"][0], tmp_path)
    model = fresh(base)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load_lora(model, folder)
    with torch.no_grad():  # the model still computes what it did
        torch.testing.assert_close(model(torch.tensor([PROMPTS[1]])).logits,
                                   fresh(base)(torch.tensor([PROMPTS[1]])).logits)


def test_registry_bounds_and_names(base, adapters):
    registry = AdapterRegistry(fresh(base), "tiny", max_loras=1)
    with pytest.raises(AdapterError, match="that is the base model's name"):
        registry.load("tiny", adapters["chat"][0])
    registry.load("a", adapters["chat"][0])
    with pytest.raises(AdapterError, match="loaded already"):
        registry.load("a", adapters["chat"][0])
    with pytest.raises(AdapterError, match="the most --max-loras allows"):
        registry.load("b", adapters["chat2"][0])
    registry.unload("a")
    assert registry.load("b", adapters["chat2"][0]).name == "b" and registry.get("a") is None


# ----- engine features: prefix cache, compiled step with fused weights ---------------------------------------------


def test_prefix_cache_keeps_each_adapters_keys_apart(base, adapters, tokenizer):
    model = fresh(base)
    chat = load_lora(model, adapters["chat"][0])
    prompt = [9707] + list(range(300, 340))  # several cache blocks
    engine = Engine(model, tokenizer, max_batch_size=2)
    first = engine.generate([prompt], greedy(), chat)[0]
    plain = engine.generate([prompt], greedy())[0]
    again = engine.generate([prompt], greedy(), chat)[0]
    assert plain.cached_tokens == 0 and again.cached_tokens > 0
    assert plain.output_ids == engine_tokens(fresh(base), tokenizer, [prompt])[0]
    assert again.output_ids == first.output_ids == engine_tokens(adapters["chat"][1], tokenizer, [prompt])[0]


def test_compiled_engine_with_fused_mlp_runs_adapter_rows(base, adapters, tokenizer):
    """With fused w1/w2 (as on a GPU) the adapter's w1 and w2 add to halves of w12; the compiled decode step runs
    rows without adapters, and a step with any adapter row runs eagerly."""
    model = fresh(base)
    chat = load_lora(model, adapters["chat"][0])
    expected = engine_tokens(model, tokenizer, PROMPTS, [chat, None, chat])
    fused = fresh(base).fuse_weights_()
    chat_fused = load_lora(fused, adapters["chat"][0])
    assert [d.out for d in chat_fused.deltas["transformer.h.0.mlp.w12"]] == [slice(0, 64), slice(64, 128)]
    torch._dynamo.reset()
    assert engine_tokens(fused, tokenizer, PROMPTS, [chat_fused, None, chat_fused], compile=True) == expected


# ----- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(base, adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("lora-server") / "server.log"
    with ServerProcess(base, "--model-name", "tiny", "--lora", f"mine={adapters['chat'][0]}", "--max-loras", "2",
                       "--api-keys", "sk-test", command=[sys.executable, "openai_api.py"], cwd=ROOT, log=log) as server:
        yield server


def test_server_serves_adapters_by_model_name(lora_server, base, adapters, tokenizer):
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="sk-test")
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "mine"} and cards["mine"].parent == "tiny" and cards["tiny"].parent is None

    def reply(model: str) -> str:
        out = client.completions.create(model=model, prompt=tokenizer.decode(PROMPTS[1]), max_tokens=12,
                                        temperature=0, extra_body={"repetition_penalty": 1.0})  # plain greedy
        assert out.model == model
        return out.choices[0].text

    def assert_merged_reply(text: str, kind: str | None) -> None:
        """The reply is what adapter ``kind`` (None: the base model) gives unmerged in this process, which is the
        merged model's."""
        model = fresh(base)
        adapter = load_lora(model, adapters[kind][0]) if kind else None
        tokens = engine_tokens(model, tokenizer, [PROMPTS[1]], adapter)[0]
        assert text == tokenizer.decode(tokens)
        assert_greedy(adapters[kind][1] if kind else fresh(base), PROMPTS[1], tokens)

    assert_merged_reply(reply("mine"), "chat")
    assert_merged_reply(reply("tiny"), None)
    # Prompt scoring (echo, as lm-eval sends it) runs with the adapter too: the merged model's logprobs.
    for name, merged in (("mine", adapters["chat"][1]), ("tiny", fresh(base))):
        out = client.completions.create(model=name, prompt=PROMPTS[1], echo=True, logprobs=0, max_tokens=0)
        with torch.no_grad():
            expected = torch.log_softmax(merged(torch.tensor([PROMPTS[1]])).logits[0].double(), -1)
        assert out.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
            [expected[i - 1, t].item() for i, t in enumerate(PROMPTS[1]) if i], abs=1e-4)

    # Loading at run time, behind the API keys, at most --max-loras.
    load = {"lora_name": "other", "lora_path": str(adapters["chat2"][0])}
    assert httpx.post(lora_server.url + "/v1/load_lora_adapter", json=load).status_code == 401
    auth = {"Authorization": "Bearer sk-test"}
    # A bad folder (here: a model folder) is a 400 that says why; the server goes on serving.
    bad = httpx.post(lora_server.url + "/v1/load_lora_adapter", headers=auth, timeout=60,
                     json={"lora_name": "bad", "lora_path": str(base)})
    assert bad.status_code == 400 and "has no adapter_config.json" in bad.json()["error"]["message"]
    assert_merged_reply(reply("mine"), "chat")

    answer = httpx.post(lora_server.url + "/v1/load_lora_adapter", json=load, headers=auth, timeout=60)
    assert answer.status_code == 200 and "added successfully" in answer.text
    assert_merged_reply(reply("other"), "chat2")
    full = httpx.post(lora_server.url + "/v1/load_lora_adapter", headers=auth, timeout=60,
                      json={"lora_name": "third", "lora_path": str(adapters["embed"][0])})
    assert full.status_code == 400 and "--max-loras" in full.json()["error"]["message"]

    # Unloaded, the name is OpenAI's 404 model_not_found, as any unknown model.
    assert httpx.post(lora_server.url + "/v1/unload_lora_adapter", json={"lora_name": "other"},
                      headers=auth).status_code == 200
    with pytest.raises(openai.NotFoundError) as missing:
        reply("other")
    assert missing.value.code == "model_not_found" and "'tiny', 'mine'" in missing.value.message
    assert httpx.post(lora_server.url + "/v1/unload_lora_adapter", json={"lora_name": "other"},
                      headers=auth).status_code == 404


def test_server_refuses_a_bad_lora_flag_at_start(base, tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "openai_api.py", "-c", str(base), "--lora", f"x={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"error: --lora x={tmp_path}: {tmp_path} has no adapter_config.json" in done.stderr
    assert "Traceback" not in done.stderr


def test_copying_a_model_keeps_adapters_working(base, adapters):
    model = fresh(base)
    adapter = load_lora(model, adapters["chat"][0])
    clone = copy.deepcopy(model)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad(), use_lora(adapter):
        torch.testing.assert_close(clone(ids).logits, model(ids).logits)


def test_qlora_adapter_serves_on_its_gptq_int4_base(tmp_path, tokenizer):
    """An adapter of a GPTQ -Int4 folder (Q-LoRA's case) runs beside the folder's own 4-bit layers (the int4
    backend, qwen's kernel): the dequantized base plus the merged adapter's greedy tokens."""
    from test_gptq import write_gptq_folder  # tests/ is on sys.path

    from qwen.quantize import Int4Linear

    gptq = tmp_path / "int4"
    write_gptq_folder(gptq, 4, group=32)
    folder, merged = make_adapter(gptq, tmp_path / "qlora", CHAT_TARGETS, seed=6)  # merged into the dequantized base
    model = AutoModelForCausalLM.from_pretrained(gptq, gptq_backend="int4", dtype=torch.float32).eval()
    adapter = load_lora(model, folder)
    assert isinstance(model.transformer.h[0].attn.c_attn.base, Int4Linear)
    got = engine_tokens(model, tokenizer, PROMPTS, [adapter, None, adapter])
    assert_greedy(merged, PROMPTS[0], got[0], margin=1e-2)
    assert_greedy(merged, PROMPTS[2], got[2], margin=1e-2)
    assert got[0] != engine_tokens(model, tokenizer, [PROMPTS[0]])[0]


# ----- docker/ run scripts (a stand-in docker client records what they would run; tests/test_docker.py runs them
# against a real daemon) -----------------------------------------------------------------------------------------

FAKE_DOCKER = """#!/usr/bin/env bash
case $1 in
    container) exit 1 ;;  # no container of that name yet
    run) printf '%s\\n' "$@" > "$FAKE_DOCKER_LOG"; echo 0123abcd ;;
    inspect) echo "running 0" ;;
esac
exit 0
"""


def test_docker_scripts_mount_adapters_and_pass_the_lora_flag(adapters, tmp_path):
    import subprocess

    from qwen.serve.process import free_port

    client, log = tmp_path / "docker", tmp_path / "run.txt"
    client.write_text(FAKE_DOCKER)
    client.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "DOCKER": str(client), "FAKE_DOCKER_LOG": str(log)}

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "docker" / name), "-i", "qwen:test", "--demo", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    chat, chat2 = adapters["chat"][0], adapters["chat2"][0]
    done = script("docker_openai_api.sh", "--port", str(free_port()), "--lora", f"mine={chat}", "--lora", str(chat2))
    assert done.returncode == 0, done.stderr
    args = log.read_text().splitlines()
    assert f"type=bind,source={chat.resolve()},target=/adapters/mine,readonly" in args
    assert f"type=bind,source={chat2.resolve()},target=/adapters/chat2,readonly" in args
    flags = args[args.index("qwen:test") + 1:]
    assert flags[0] == "api" and " ".join(flags).count("--lora") == 2
    assert "mine=/adapters/mine" in flags and "chat2=/adapters/chat2" in flags

    done = script("docker_cli_demo.sh", "--lora", str(chat))
    assert done.returncode == 0, done.stderr
    assert "/adapters/chat" in log.read_text().splitlines()

    for name, args, message in [
        ("docker_openai_api.sh", ["--lora", f"x={tmp_path / 'nowhere'}"], "does not exist"),
        ("docker_openai_api.sh", ["--lora", f"x={tmp_path}"], "has no adapter_config.json"),
        ("docker_cli_demo.sh", ["--lora", str(chat), "--lora", str(chat2)], "take one --lora"),
        ("docker_finetune.sh", ["--lora", str(chat)], "--lora is not a flag of this script"),
    ]:
        done = script(name, "--port", str(free_port()), *args) if "api" in name else script(name, *args)
        assert done.returncode != 0 and "error: " in done.stderr and message in done.stderr, done.stderr


def test_python_api_chat_and_chat_stream_with_an_adapter(base, adapters, tokenizer):
    """``with use_lora(adapter): model.chat(...)``, and chat_stream, whose generate() runs in a thread of its own."""
    model = fresh(base)
    adapter = load_lora(model, adapters["chat"][0])
    with use_lora(adapter):
        reply, _ = model.chat(tokenizer, "Hello", history=None, do_sample=False, max_new_tokens=8)
        streamed = list(model.chat_stream(tokenizer, "Hello", history=None, do_sample=False, max_new_tokens=8))[-1]
    plain, _ = model.chat(tokenizer, "Hello", history=None, do_sample=False, max_new_tokens=8)
    merged, _ = adapters["chat"][1].chat(tokenizer, "Hello", history=None, do_sample=False, max_new_tokens=8)
    assert reply == streamed == merged != plain
