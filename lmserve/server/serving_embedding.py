"""POST /v1/embeddings and /pooling: one vector per input from the served model, and /v1/encode (LMDeploy's
tokenization endpoint: text -> input_ids).

Pooling: an embedding model (--task embed, e.g. a BERT-family encoder) pools as its checkpoint declares (mean or
CLS, normalised or not: model/pooling.py); a generative model gives the mean of its final hidden states (after
the last norm) over all prompt tokens, L2-normalised. Inputs are tokenized with the tokenizer's special tokens
(BOS, or BERT's [CLS] ... [SEP]); token-id inputs are used as given. `dimensions` truncates and renormalises, for
models trained for it (Matryoshka: `matryoshka_dimensions` / `is_matryoshka` in config.json).
"""
from __future__ import annotations

import base64
import math
import struct
from typing import Any

from fastapi import Request

from lmserve.server.errors import APIError, not_supported
from lmserve.server.limits import check_num_prompts, check_text
from lmserve.server.protocol import (EmbeddingData, EmbeddingsRequest, EmbeddingsResponse, EncodeRequest,
                                     EncodeResponse, PoolingData, PoolingRequest, PoolingResponse, UsageInfo)
from lmserve.server.serving_chat import render_chat
from lmserve.server.serving_lora import request_lora
from lmserve.server.state import ServerState, random_id


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)     # NOTE: JSON true/false are not token ids


async def _inputs(state: ServerState, value: Any) -> tuple[list[list[int]], list[str]]:
    """-> (token ids, the field naming each). Only the shape is checked here; emptiness, length and vocabulary are
    the engine's one check (state.pool)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, "input must be a string, a list of strings, token ids or a list of token-id lists",
                       param="input")
    if all(isinstance(v, int) for v in value):
        value = [value]
    check_num_prompts(state.config, len(value), "input")
    out, wheres = [], []
    for i, v in enumerate(value):
        where = "input" if len(value) == 1 else f"input[{i}]"
        ids = await state.encode(v, where, add_special_tokens=True) if isinstance(v, str) else v
        if not isinstance(ids, list) or not all(_is_token_id(t) for t in ids):
            raise APIError(400, f"{where} must be a string or a list of token ids", param=where)
        out.append(ids)
        wheres.append(where)
    return out, wheres


def _format(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":     # OpenAI's: little-endian float32
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _check_dimensions(state: ServerState, dimensions: int | None) -> None:
    size, allowed = state.engine.embedding_size, state.engine.embedding_dimensions
    if dimensions is None or dimensions == size:
        return
    if allowed is None:
        raise not_supported("dimensions", f"dimensions other than the model's embedding size ({size}) on a model "
                                          "not trained for truncation (Matryoshka)")
    if not 1 <= dimensions <= size or (allowed and dimensions not in allowed):
        sizes = ", ".join(map(str, allowed)) if allowed else f"1 to {size}"
        raise APIError(400, f"dimensions must be one of the sizes this model was trained for ({sizes}); got "
                            f"{dimensions}", param="dimensions")


def _truncate(vector: list[float], dimensions: int) -> list[float]:
    vector = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


async def _embed(state: ServerState, raw: Request, model: str | None, value: Any,
                 dimensions: int | None) -> tuple[list[list[float]], UsageInfo]:
    state.check_model(model)
    state.check_available()
    if request_lora() is not None:      # NOTE: pooling requests carry no adapter (engine.encode takes ids only)
        raise APIError(400, f"'{model}' is a LoRA adapter; embeddings come from the base model "
                            f"'{state.base_model_name}' only", param="model", code="wrong_model_task")
    if state.engine.task == "score":
        raise APIError(400, f"the model '{state.model_name}' is a cross-encoder (--task score); it serves /rerank "
                            "and /score, not embeddings", param="model", code="wrong_model_task")
    _check_dimensions(state, dimensions)
    inputs, wheres = await _inputs(state, value)
    vectors = await state.pool(raw, inputs, wheres)
    if dimensions is not None and dimensions != state.engine.embedding_size:
        vectors = [_truncate(v, dimensions) for v in vectors]
    num_tokens = sum(len(ids) for ids in inputs)
    return vectors, UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens)


async def create_embeddings(state: ServerState, req: EmbeddingsRequest, raw: Request) -> EmbeddingsResponse:
    vectors, usage = await _embed(state, raw, req.model, req.input, req.dimensions)
    data = [EmbeddingData(index=i, embedding=_format(v, req.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingsResponse(data=data, model=state.model_name, usage=usage)


async def create_pooling(state: ServerState, req: PoolingRequest, raw: Request) -> PoolingResponse:
    vectors, usage = await _embed(state, raw, req.model, req.input, req.dimensions)
    data = [PoolingData(index=i, data=_format(v, req.encoding_format)) for i, v in enumerate(vectors)]
    return PoolingResponse(id=random_id("pool"), model=state.model_name, data=data, usage=usage)


async def encode(state: ServerState, req: EncodeRequest) -> EncodeResponse:
    async def one(text: str, where: str) -> list[int]:
        if req.do_preprocess:
            check_text(text, where)
            text = render_chat(state, [{"role": "user", "content": text}], {}, where)
            return await state.encode(text, where, add_special_tokens=False)
        return await state.encode(text, where, add_special_tokens=bool(req.add_bos))

    if isinstance(req.input, str):
        ids = await one(req.input, "input")
        return EncodeResponse(input_ids=ids, length=len(ids))
    check_num_prompts(state.config, len(req.input), "input")
    all_ids = [await one(t, f"input[{i}]") for i, t in enumerate(req.input)]
    return EncodeResponse(input_ids=all_ids, length=[len(ids) for ids in all_ids])
