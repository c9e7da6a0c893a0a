"""The development gateway's deterministic answer to a chat completions request."""

from __future__ import annotations

import hashlib
from typing import Any

from .models import ChatRequest

_PREVIEW_CHARS = 200


def count_tokens(text: str) -> int:
    """Whitespace-separated words: a stable, model-free stand-in for a tokenizer."""
    return len(text.split())


def complete(request: ChatRequest, *, created: int) -> dict[str, Any]:
    """An OpenAI `chat.completion` that echoes the last user message; same input, same answer."""
    prompt = [message.text() for message in request.messages]
    last_user = next((m.text() for m in reversed(request.messages) if m.role == "user"), prompt[-1])
    content = f"gastown-cloud development gateway ({request.model}) heard: {last_user}"
    content = content[:_PREVIEW_CHARS]
    prompt_tokens = sum(count_tokens(text) for text in prompt)
    completion_tokens = count_tokens(content)
    digest = hashlib.sha256(request.model_dump_json(by_alias=True).encode()).hexdigest()
    return {
        "id": f"chatcmpl-{digest[:24]}",
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
