"""Request and response bodies in OpenAI's schema (the part a batch-1 local server can honour).

Requests are validated strictly: a wrong JSON type is a 400, not a silent coercion. Fields that
OpenAI defines but this server cannot honour exactly (`n` != 1, logprobs, penalties) are refused
with a 400 naming the field; fields it does not know at all are ignored, as OpenAI-compatible
servers do. Extensions: `top_k` and `ignore_eos` in requests, `speculative` in responses.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: roles a chat template understands; OpenAI's `developer` is a system turn
Role = Literal["system", "developer", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


class ChatMessage(StrictRequest):
    role: Role
    content: str | list[TextPart]

    def as_template_turn(self) -> dict:
        """The {role, content} dict a chat template takes."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(StrictRequest):
    include_usage: bool = False


class SamplingRequest(StrictRequest):
    """What the two generation endpoints share."""

    model: str | None = None  # None or the served name
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # wins over max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension; 0 or -1 = off
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # None: a fresh one per request
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: generate max_tokens tokens (benchmarks)
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def token_limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a request this server cannot answer as asked, else None."""
        if self.n != 1:
            return "n", "only n=1 is supported (one answer per request)"
        if self.frequency_penalty or self.presence_penalty:
            param = "frequency_penalty" if self.frequency_penalty else "presence_penalty"
            return param, f"{param} is not supported: it would change the target's distribution"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported"
        return super().unsupported()


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", "send one prompt per request (a string or a list of one string)"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


# -- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpeculativeStats(BaseModel):
    """What speculation did for one request (extension field `speculative`)."""

    target_forwards: int  # prefill included
    mean_accept_len: float  # tau: new tokens per target forward, as `eaglespec generate --json` reports
    drafts: int  # decode steps that verified a draft (steps where drafting did not pay verify the root alone)
    drafted_tokens: int  # tree nodes verified beyond the root, summed over steps
    accepted_tokens: int  # drafted tokens the target accepted (bonus tokens not counted)
    tokens_per_s: float  # new tokens over generation time (queueing excluded)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: None = None


def _unset(value) -> bool:
    return value is None


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_unset)  # in the first chunk only
    content: str | None = Field(None, exclude_if=_unset)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ResponseBase(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None  # in a stream: null, and set in the last chunk when include_usage asks
    speculative: SpeculativeStats | None = Field(None, exclude_if=_unset)  # once per answer


class ChatCompletion(ResponseBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(ResponseBase):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(ResponseBase):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "eaglespec"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
