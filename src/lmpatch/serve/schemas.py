"""The service's request bodies (pydantic models, which also make its OpenAPI schema).

Only what the service reads is declared; OpenAI clients send more fields (``logprobs``,
``presence_penalty`` ...), which are accepted and ignored, except the few whose meaning
the service cannot honour (``n`` > 1, several prompts), which are refused by name.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatBody", "CompletionBody", "EditBody", "Message", "SnapshotBody"]

MAX_TOKENS_LIMIT = 2048


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: the service serves one model.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (the default) decodes greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings that end the answer.")
    stream: bool = Field(False, strict=True, description="true or false (a JSON boolean).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="Only one answer per request.")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionBody(_Sampling):
    prompt: Union[str, list[str]] = Field(..., description="One prompt (a list of exactly one is accepted).")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)


class TextPart(BaseModel):
    """One part of a message's content in OpenAI's list form; only text parts can be read."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]] = Field(..., description="Text, or OpenAI's list of text parts.")

    @field_validator("content")
    @classmethod
    def _as_text(cls, content: str | list[TextPart]) -> str:
        # Current OpenAI clients may send [{"type": "text", "text": ...}]; the parts are joined.
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        if len(text) > 100_000:
            raise ValueError("a message holds at most 100,000 characters")
        return text


class ChatBody(_Sampling):
    messages: list[Message] = Field(..., min_length=1, max_length=256)
    max_tokens: int = Field(128, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)


class EditBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: Union[dict[str, Any], list[dict[str, Any]]] = Field(
        ..., description="One edit request or a list: {prompt, subject, target_new, [locality, rephrase ...]}.")
    method: str = Field("rome", max_length=64, description="Any method `lmpatch methods` lists.")
    hparams: dict[str, Any] = Field(default_factory=dict, description="The method's hyperparameters to override.")
    expected_generation: int | None = Field(
        None, ge=0, description="Refuse (409) unless the ledger is still at this generation.")
    actor: str | None = Field(None, max_length=200, description="Who asks (shown in the ledger).")


class SnapshotBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,100}$",
                             description="Folder name under the ledger's snapshots/ (default: gen-N; not . or ..).")

    @field_validator("name")
    @classmethod
    def _not_a_parent(cls, name: str | None) -> str | None:
        # "." and ".." pass the pattern but name the snapshots folder itself or the ledger's.
        if name is not None and set(name) == {"."}:
            raise ValueError("a snapshot name cannot be made of dots only")
        return name
