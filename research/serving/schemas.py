"""Request and response bodies of the HTTP API (pydantic), and the OpenAI-style error body.

Requests are validated by FastAPI against these models; a body that does not fit is answered
400 with `error_body` naming the field (research.serving.app installs the handler). `model`
is ignored (the served model answers), and so are unknown fields (OpenAI clients send extras
such as `user`); fields that would change the output in ways this server does not implement
(`echo`, `logprobs`, `best_of`, `suffix`, penalties, `logit_bias`) are accepted only at their
neutral value (`check_unsupported`).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# Numbers may be JSON ints or floats, never strings or booleans.
Number = Union[StrictInt, StrictFloat]

# name -> its neutral values; any other value is a 400 naming the field.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {})}


class CompletionRequest(BaseModel):
    """POST /v1/completions (OpenAI's legacy completions API)."""

    model_config = ConfigDict(extra="allow")

    prompt: Union[StrictStr, list[StrictStr]]
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: Number = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: Number = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt = Field(0, ge=0)
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: StrictInt = Field(1, ge=1, le=64)
    seed: Union[StrictInt, None] = None
    stream: StrictBool = False
    model: Union[StrictStr, None] = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def check_unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first extra field set to a non-neutral value, else None."""
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED_FIELDS.items():
            value = extra.get(name, neutral[0])
            if not any(value == v and isinstance(value, bool) == isinstance(v, bool)
                       for v in neutral):
                return name, (f"{name}={value!r} is not supported by this server; leave it out "
                              f"or send {neutral[0]!r}.")
        return None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Union[Literal["stop", "length", "cancelled", "error"], None]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """The answer of POST /v1/completions without `stream` (with it: chunks of the same shape,
    one text delta each, without `usage`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ClassifyRequest(BaseModel):
    """POST /v1/classify: one text, a list of texts, or for a sentence-pair run one pair
    [a, b] or a list of pairs [[a, b], ...]."""

    model_config = ConfigDict(extra="allow")

    input: Union[StrictStr, list[StrictStr], list[list[StrictStr]]]
    model: Union[StrictStr, None] = None


class ClassifyItem(BaseModel):
    index: int
    label: Union[str, None] = None            # classification: the most probable class
    probabilities: Union[dict[str, float], None] = None
    value: Union[float, None] = None          # regression runs: the predicted value


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassifyItem]
    model: str


def error_body(message: str, param: str | None, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
