"""OpenAI request schemas (the fields this server reads) and OpenAI-shaped error bodies.

Fields the OpenAI API has and this server does not support (n > 1, logprobs, echo, penalties, tools) are
rejected with a 400 that names them rather than silently ignored; unknown fields are ignored, as OpenAI's
clients send some of their own.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # "yes" is not true

    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share. Strict types, as OpenAI's API checks them: `true` or `2.0`
    for an integer field, or "5" for a number, is a 400 naming the field, not silently 1, 2 or 5."""
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=0)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)  # an extension (vLLM has it too)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    logprobs: Optional[Union[bool, int]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Optional[str] = None
    ignore_eos: bool = False  # an extension (vLLM has it too): generate max_tokens tokens
    # LayerSkip settings (extra body fields); None: the server's defaults
    strategy: Optional[Literal["autoregressive", "early_exit", "self_speculative"]] = None
    exit_layer: Optional[int] = None
    num_speculations: Optional[int] = None
    # the drafting policy (csrc/engine/draft_policy.h); None: the model's stored settings, else off
    draft_threshold: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    adaptive: Optional[bool] = None

    def unsupported(self) -> list[str]:
        """Names of the set fields this server cannot honour."""
        bad = []
        if self.n != 1:
            bad.append("n")
        if self.logprobs not in (None, False, 0):
            bad.append("logprobs")
        if self.presence_penalty != 0.0:
            bad.append("presence_penalty")
        if self.frequency_penalty != 0.0:
            bad.append("frequency_penalty")
        return bad


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(default=16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    suffix: Optional[str] = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + [n for n, bad in (("echo", self.echo), ("suffix", self.suffix)) if bad]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # templates may read more keys (name, ...)

    role: str
    content: Optional[Union[str, list[dict]]] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = Field(default=None, ge=0)
    tools: Optional[list] = None
    response_format: Optional[dict] = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.tools:
            bad.append("tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            bad.append("response_format")
        return bad
