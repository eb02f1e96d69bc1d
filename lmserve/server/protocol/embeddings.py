"""Embeddings, pooling and encode models (/v1/embeddings, /pooling, /v1/encode)."""
from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, StrictInt

from lmserve.server.protocol.common import UsageInfo, _Model


# ---- embeddings / pooling / encode --------------------------------------------------------------------------
EmbeddingInput = str | list[str] | list[StrictInt] | list[list[StrictInt]]    # strict: no true/false as ids


class EmbeddingsRequest(_Model):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(_Model):
    index: int
    object: str = "embedding"
    embedding: list[float] | str


class EmbeddingsResponse(_Model):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


class PoolingRequest(_Model):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class PoolingData(_Model):
    index: int
    object: str = "pooling"
    data: list[float] | str


class PoolingResponse(_Model):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[PoolingData]
    usage: UsageInfo


class EncodeRequest(_Model):
    input: str | list[str]
    do_preprocess: bool | None = False
    add_bos: bool | None = True


class EncodeResponse(_Model):
    input_ids: list[int] | list[list[int]]
    length: int | list[int]
