"""What real OpenAI clients rely on beyond chat: prompt logprobs with echo (lm-eval's local-completions),
token-id prompts, best_of, models.retrieve, 400 errors naming the field, no silently ignored fields, and
503 with Retry-After when the queue is full. A real ``openai_api.py`` subprocess on 127.0.0.1, driven
by the ``openai`` client and httpx."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from qwen.serve.process import ServerProcess

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def reference_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_models_retrieve_and_context_length(client, server, tiny_model):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL
    # Dynamic NTK is on in the original configs: the default context is 4x seq_length, said at start-up.
    assert card.model_extra["max_model_len"] == 4 * tiny_model.config.seq_length
    assert f"context: {4 * tiny_model.config.seq_length} tokens" in server.log.read_text()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_echo_scores_the_prompt_like_the_model(client, tiny_model, tokenizer):
    text = "The capital of France is Paris, 巴黎."
    out = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=3, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and out.usage.completion_tokens == 0
    lp = choice.logprobs
    ids = tokenizer.encode(text)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(reference_logprobs(tiny_model, ids), abs=1e-4)
    assert all(len(top) == 3 for top in lp.top_logprobs[1:])
    # text_offset: where each token's text starts in the returned text.
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert text[lp.text_offset[1]:lp.text_offset[2]] == lp.tokens[1]
    # Token-id prompts (one, or a batch) score the same, and can generate after the echo.
    by_ids = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    assert by_ids.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:4]], echo=True, logprobs=1, max_tokens=3,
                                      temperature=0)
    assert len(batch.choices) == 2 and batch.choices[1].text.startswith(tokenizer.decode(ids[:4]))
    assert len(batch.choices[1].logprobs.tokens) == 4 + 3


def test_streamed_completion_logprobs(client):
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, logprobs=1, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, logprobs=1, temperature=0,
                                            stream=True))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == full.choices[0].logprobs.tokens
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert values == pytest.approx(full.choices[0].logprobs.token_logprobs, abs=1e-5)


def test_best_of_returns_the_candidate_with_the_highest_mean_logprob(client):
    settings = {"model": MODEL, "prompt": "Once", "max_tokens": 4, "temperature": 1.0, "seed": 7}
    candidates = client.completions.create(n=3, logprobs=0, **settings).choices
    best = max(candidates, key=lambda c: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs))
    out = client.completions.create(best_of=3, **settings)
    assert [c.text for c in out.choices] == [best.text] and out.choices[0].logprobs is None


def test_client_errors_are_400_and_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert info.value.body["param"] == "temperature" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="def f(", suffix="\n    return 1")
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"frobnicate": 1})


def test_harmless_fields_are_accepted(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         user="u1", metadata={"k": "v"}, store=False, parallel_tool_calls=False)
    assert out.choices[0].message.role == "assistant"


@pytest.mark.parametrize("waiting", ["generation", "scoring"])
def test_full_queue_answers_503_with_retry_after(tiny_chat, tmp_path, waiting):
    """One slot and a queue of one: with one request running and one waiting, the next is refused at once
    with 503 and Retry-After; the two accepted ones finish, and the server serves normally afterwards. Prompt
    scoring (echo, as lm-eval sends it) queues in the engine like any request."""
    with ServerProcess(tiny_chat, "--model-name", MODEL, "--max-batch-size", "1", "--max-queue", "1",
                       log=tmp_path / "log") as server:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 600, "temperature": 0}
        second_body = body if waiting == "generation" else {"model": MODEL, "prompt": "The capital of France",
                                                             "echo": True, "logprobs": 1, "max_tokens": 0}

        def wait_for(key: str) -> None:
            deadline = time.monotonic() + 60
            while httpx.get(f"{server.url}/health").json()[key] < 1:
                assert time.monotonic() < deadline, f"no request became {key}"
                time.sleep(0.02)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as http:
                first = asyncio.create_task(http.post(f"{server.url}/v1/completions", json=body))
                await asyncio.to_thread(wait_for, "running")
                second = asyncio.create_task(http.post(f"{server.url}/v1/completions", json=second_body))
                await asyncio.to_thread(wait_for, "waiting")
                refused = await http.post(f"{server.url}/v1/completions", json=body)
                return [refused, await first, await second]

        refused, first, second = asyncio.run(scenario())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert json.loads(refused.text)["error"]["code"] == "overloaded"
        assert first.status_code == second.status_code == 200
        if waiting == "scoring":
            [choice] = second.json()["choices"]
            assert choice["text"] == second_body["prompt"] and choice["logprobs"]["token_logprobs"][0] is None
            assert all(lp < 0 for lp in choice["logprobs"]["token_logprobs"][1:])
        ok = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


def test_tokenizer_endpoints(server, tokenizer):
    """vLLM's /tokenizer_info, /tokenize and /detokenize: what lm-eval's local-completions uses when the
    user gives no tokenizer."""
    from qwen.chat import DEFAULT_SYSTEM, make_context

    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] > 0
    text = "Hello <|im_end|> 世界"
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
    assert ids == tokenizer.encode(text, allowed_special=set())  # special-token look-alikes stay text
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"] == text
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == make_context(tokenizer, "hi", None, DEFAULT_SYSTEM)[1]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**7]}).status_code == 400


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user"]}}, "required": ["name", "age", "role"], "additionalProperties": False}


def test_response_format_json_schema_always_validates(client):
    """A random model writes valid JSON for the schema every time: non-streamed (n=3, sampled), and the
    streamed deltas joined."""
    import jsonschema

    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Who?"}], response_format=schema_format,
                max_tokens=60, temperature=1.0, seed=3)
    out = client.chat.completions.create(n=3, **body)
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **body)
                       if c.choices)
    jsonschema.validate(json.loads(streamed), PERSON)
    text = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=60, temperature=0,
                                     extra_body={"response_format": schema_format})
    jsonschema.validate(json.loads(text.choices[0].text), PERSON)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "nonsense"}}})
    assert info.value.body["param"] == "response_format"


def test_logit_bias_forces_and_bans(client, tokenizer):
    token = tokenizer.encode(" banana")[0]
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0, logit_bias={str(token): 100})
    assert out.choices[0].text == " banana" * 3
    free = client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0, logprobs=0)
    first = tokenizer.encode(free.choices[0].text)[0]
    banned = client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != free.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, logit_bias={"999999": 1})
    assert info.value.body["param"] == "logit_bias"
