"""Request bodies of the OpenAI-compatible API (the fields this server understands).

A field a client sets is either honoured, accepted as harmless metadata (``user``, ``metadata``,
``store``, ``parallel_tool_calls``), or refused with a 400 naming it: nothing is silently ignored,
so a client never believes it got what it asked for when it did not. Range checks live here so
that a bad value is a 400 naming the field before any work starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Lenient):
    name: str
    arguments: str = ""


class ToolCall(_Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # developer: system
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(_Lenient):
    """OpenAI's function (name, description, JSON-schema parameters), or the original Qwen server's
    (name_for_model, name_for_human, description_for_model, a list of parameters)."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] | list[dict[str, Any]] = Field(default_factory=dict)
    name_for_human: str | None = None
    strict: bool | None = None  # OpenAI's: a forced call's arguments follow the schema exactly, or 400

    @model_validator(mode="before")
    @classmethod
    def _qwen_style(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data and "name_for_model" in data:
            data = {**data, "name": data["name_for_model"],
                    "description": data.get("description_for_model", data.get("description", ""))}
        return data

    @property
    def arguments_schema(self) -> dict[str, Any]:
        """The arguments' JSON schema (any object for the Qwen-style parameter list)."""
        return self.parameters if isinstance(self.parameters, dict) and self.parameters else {"type": "object"}


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class JSONSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions. Unknown top-level fields are kept in
    ``model_extra`` so that the app can refuse them by name."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's: when batch slots are scarce, lower values are admitted first (default 0; ties in arrival order)
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    # Accepted and ignored, as OpenAI-compatible servers do: they do not change the output.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], not {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None  # accepted; a ReAct reply makes one call at a time


class CompletionRequest(SamplingFields):
    # Text, texts, token ids, or lists of token ids (as lm-eval and vLLM clients send them).
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=0)  # 0 with echo scores the prompt without generating
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None


class TokenizeRequest(_Lenient):
    """vLLM's ``/tokenize``: a text prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False  # Qwen adds none either way


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(_Lenient):
    """``POST /v1/load_lora_adapter``, as vLLM names it."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Lenient):
    lora_name: str = Field(min_length=1)


class ResponsesRequest(BaseModel):
    """``POST /v1/responses`` (OpenAI's Responses API), the fields this server serves; it runs as the chat
    completion these fields translate to (``routes.responses_api``). Unknown fields are refused by name."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool | None = None  # False: not kept for GET or previous_response_id (default: kept)
    previous_response_id: str | None = None
    # Accepted and ignored: they do not change the output.
    metadata: dict[str, Any] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    include: list[str] | None = None  # extra output data to include: none is offered, so only [] is served
