"""POST /rerank (/v1/rerank, /v2/rerank) and /score (/v1/score): relevance of text pairs.

A cross-encoder (--task score) reads each pair as one input (the tokenizer's pair template) and its classifier
gives the score (sentence-transformers' CrossEncoder.predict). An embedding model (--task embed, a bi-encoder)
embeds each distinct text once and scores a pair by the cosine of the two vectors, as vLLM does. A generative
model is refused with a 400 naming `model`.
"""
from __future__ import annotations

import asyncio
import math

from fastapi import Request

from lmserve.server.errors import APIError
from lmserve.server.limits import check_num_prompts, check_text
from lmserve.server.protocol.score import (RerankDocument, RerankRequest, RerankResponse, RerankResult,
                                           RerankUsage, ScoreData, ScoreRequest, ScoreResponse, ScoreUsage)
from lmserve.server.state import ServerState, random_id


def _check_task(state: ServerState, model: str | None) -> None:
    state.check_model(model)
    state.check_available()
    if state.engine.task not in ("score", "embed"):
        raise APIError(400, f"the model '{state.model_name}' is a generative model; rerank and score need a "
                            "cross-encoder (--task score) or an embedding model (--task embed)", param="model",
                       code="wrong_model_task")


async def _pair_ids(state: ServerState, a: str, b: str, param: str) -> list[int]:
    for text in (a, b):
        state.check_text_fits(text, param)
    hf = state.tokenizer.hf
    ids = await asyncio.to_thread(lambda: hf(a, b, add_special_tokens=True)["input_ids"])
    return list(ids)


async def score_pairs(state: ServerState, raw: Request, pairs: list[tuple[str, str]],
                      params: list[str]) -> tuple[list[float], int]:
    """-> (one score per pair, input tokens used). params[i] names pair i's field for errors."""
    if state.engine.task == "score":
        inputs = [await _pair_ids(state, a, b, p) for (a, b), p in zip(pairs, params)]
        outs = await state.pool(raw, inputs, params)
        return [float(o[0]) for o in outs], sum(len(ids) for ids in inputs)
    texts: dict[str, str] = {}     # distinct text -> the field it first came from
    for (a, b), p in zip(pairs, params):
        texts.setdefault(a, p)
        texts.setdefault(b, p)
    ids = {t: await state.encode(t, p, add_special_tokens=True) for t, p in texts.items()}
    vectors = await state.pool(raw, list(ids.values()), list(texts.values()))
    vec = dict(zip(ids, vectors))
    return [_cosine(vec[a], vec[b]) for a, b in pairs], sum(len(i) for i in ids.values())


def _cosine(x: list[float], y: list[float]) -> float:
    dot = sum(a * b for a, b in zip(x, y))
    norm = math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y))
    return dot / norm if norm else 0.0


def _document_text(doc, i: int) -> str:
    text = doc if isinstance(doc, str) else doc.get("text")
    if not isinstance(text, str):
        raise APIError(400, f"documents[{i}] must be a string or an object with a string `text`",
                       param=f"documents[{i}]")
    return text


async def rerank(state: ServerState, req: RerankRequest, raw: Request) -> RerankResponse:
    _check_task(state, req.model)
    check_text(req.query, "query")
    if not req.documents:
        raise APIError(400, "documents must not be empty", param="documents")
    check_num_prompts(state.config, len(req.documents), "documents")
    if req.top_n is not None and req.top_n < 1:
        raise APIError(400, f"top_n must be at least 1, got {req.top_n}", param="top_n")
    docs = [_document_text(d, i) for i, d in enumerate(req.documents)]
    scores, num_tokens = await score_pairs(state, raw, [(req.query, d) for d in docs],
                                           [f"documents[{i}]" for i in range(len(docs))])
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[:req.top_n or len(docs)]
    results = [RerankResult(index=i, relevance_score=scores[i],
                            document=RerankDocument(text=docs[i]) if req.return_documents else None) for i in order]
    return RerankResponse(id=random_id("rerank"), model=state.model_name, usage=RerankUsage(total_tokens=num_tokens),
                          results=results)


async def score(state: ServerState, req: ScoreRequest, raw: Request) -> ScoreResponse:
    """text_1 and text_2 as 1:1, 1:N (text_1 one string) or N:N (equal lengths, pairwise)."""
    _check_task(state, req.model)
    left = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    right = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    if not left or not right:
        raise APIError(400, "text_1 and text_2 must not be empty", param="text_1" if not left else "text_2")
    if len(left) == 1:
        left = left * len(right)
    elif len(left) != len(right):
        raise APIError(400, f"text_2 must have one text or as many as text_1 ({len(left)}), got {len(right)}",
                       param="text_2")
    check_num_prompts(state.config, len(right), "text_2")
    for i, t in enumerate(left + right):
        check_text(t, "text_1" if i < len(left) else "text_2")
    scores, num_tokens = await score_pairs(state, raw, list(zip(left, right)),
                                           [f"text_2[{i}]" for i in range(len(right))])
    return ScoreResponse(id=random_id("score"), model=state.model_name,
                         data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                         usage=ScoreUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
