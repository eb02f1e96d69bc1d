"""Rerank and score models: /v1/rerank, /rerank, /v2/rerank (Jina/Cohere shape) and /v1/score, /score (vLLM's)."""
from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from lmserve.server.protocol.common import _Model


class RerankRequest(_Model):
    model: str | None = None
    query: str
    documents: list[str | dict[str, Any]] = Field(description="strings, or objects with a `text` field")
    top_n: int | None = Field(default=None, description="return the best N (default: all)")
    return_documents: bool = True


class RerankDocument(_Model):
    text: str


class RerankResult(_Model):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(_Model):
    total_tokens: int


class RerankResponse(_Model):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ScoreRequest(_Model):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]


class ScoreData(_Model):
    index: int
    object: str = "score"
    score: float


class ScoreUsage(_Model):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(_Model):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: ScoreUsage
