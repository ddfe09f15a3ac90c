"""Request bodies of the OpenAI API (plus vLLM's extra sampling fields), validated by pydantic, and their
translation to SamplingParams. Unknown fields are allowed and reported, as vLLM does."""
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsinfer.sampling_params import SamplingParams
from dsinfer.server.constraints import (ResponseFormat, StructuredOutputsBody, constraint_field,
                                        requested_constraint)


UNSUPPORTED = {"tools": "tool calls are made by chat completions", "tool_choice": "tool calls are made by chat "
               "completions", "functions": "use tools", "function_call": "use tool_choice",
               **{f"guided_{k}": "use structured_outputs" for k in ("json", "regex", "choice", "grammar",
                                                                      "whitespace_pattern")}}
HARMLESS = {"tool_choice": ("none",), "tools": ([],), "functions": ([],)}


class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(field, what to do instead) of fields that would change what the output means and that this server
        does not implement: a request must not get free text back as if they had been honoured."""
        extra = self.model_extra or {}
        return [(f, why) for f, why in UNSUPPORTED.items()
                if extra.get(f) is not None and extra[f] not in HARMLESS.get(f, ())]


class StreamOptions(OpenAIBody):
    include_usage: bool = False


class SamplingFields(OpenAIBody):
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (a string key) to a bias in [-100, 100]
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None

    @property
    def constraint_field(self) -> str:
        return constraint_field(self.response_format, self.structured_outputs)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty or 1.0, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, output_kind="delta", logit_bias=self.logit_bias,
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            include_stop_str_in_output=self.include_stop_str_in_output,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            structured_outputs=requested_constraint(self.response_format, self.structured_outputs))

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (the handler checks): the prompt alone
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """max_tokens 0 (echo) still generates one token, as the engine needs one; the handler drops it. Echo
        with logprobs asks for the prompt's logprobs too."""
        params = super().sampling_params(max(max_tokens, 1), logprobs)
        if self.echo and logprobs is not None:
            params = replace(params, prompt_logprobs=logprobs)
        return params


class ChatMessage(OpenAIBody):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls, for the chat template
    tool_call_id: str | None = None       # a tool message: the call it answers
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it: role and text content, and the tool fields it has."""
        extra = {k: getattr(self, k) for k in ("name", "tool_calls", "tool_call_id", "reasoning_content")
                 if getattr(self, k) is not None}
        return {"role": self.role, "content": self.text(), **extra}


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # false: at most one call (what a forced call's grammar allows)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def tool_mode(self) -> str:
        """none (no tools, or tool_choice none), auto, required, or named."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"
