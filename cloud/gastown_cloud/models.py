"""Request bodies of the cloud API, validated strictly (no type coercion), camelCase on the wire."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

# An id or a name: non-empty, bounded.
Text = Annotated[str, Field(min_length=1, max_length=200)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class CreateTown(_Body):
    """`POST /api/gastown/towns`."""

    user_id: Text = Field(alias="userId")
    organization_id: Text | None = Field(default=None, alias="organizationId")
    name: Text
    sandbox_url: str | None = Field(default=None, alias="sandboxUrl", max_length=2000)

    @field_validator("sandbox_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError("must be an http or https URL") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http or https URL")
        return value


class RefreshInput(_Body):
    """The refresh routes' input, after unwrapping tRPC's `{"json": …}`."""

    town_id: Text = Field(alias="townId")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: the string, or the `text` of its text parts."""
        if isinstance(self.content, str):
            return self.content
        parts = self.content or []
        return " ".join(str(p.get("text", "")) for p in parts if p.get("type") == "text")


class ChatRequest(_Body):
    """The OpenAI chat completions request, as far as the development gateway reads it."""

    model: Text
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False


class ConfigFailure(_Body):
    """Why a sandbox could not apply a generation: a sentence and the 422 details."""

    message: str = Field(min_length=1, max_length=2000)
    details: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)


class ConfigReport(_Body):
    """`POST /api/gastown/towns/{id}/config/status`: what the sandbox made of a generation."""

    observed_generation: int = Field(alias="observedGeneration", ge=0, le=2**62)
    revision: str | None = Field(default=None, max_length=200)
    error: ConfigFailure | None = None
