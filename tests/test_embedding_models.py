"""Encoder (BERT-family) embedding models in the engine: equal to transformers + the checkpoint's pooling, batched
by the scheduler without chunking; pooling config parsing; task resolution."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lmserve.config import EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.outputs import InvalidRequestError
from lmserve.model.pooling import load_pooling_config
from lmserve.model.registry import resolve_task
from lmserve.sampling_params import SamplingParams
from tests.embedding_models import WORDS, make_tiny_bert, minilm_path, reference_embeddings


def _embed_all(engine: LLMEngine, token_ids: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """All requests queued at once; returns the vectors and the number of sequences run in each step."""
    for i, ids in enumerate(token_ids):
        engine.add_pooling_request(f"r{i}", ids)
    got, step_sizes = {}, []
    while engine.has_unfinished():
        outs = engine.step()
        step_sizes.append(len(outs))
        for out in outs:
            got[out.request_id] = out.embedding
    return torch.tensor([got[f"r{i}"] for i in range(len(token_ids))]), step_sizes


def _token_ids(engine: LLMEngine) -> list[list[int]]:
    texts = [" ".join(WORDS[i % 7: i % 7 + n]) for i, n in enumerate((1, 3, 9, 25, 2, 14, 30, 5))]
    texts.append(" ".join(WORDS * 2)[:250])             # long: needs (nearly) a whole step to itself
    return [engine.tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False), ("max", True), (None, True)])
def test_tiny_bert_equals_transformers(tmp_path, pooling, normalize):
    path = make_tiny_bert(str(tmp_path / "bert"), pooling=pooling, normalize=normalize)
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype="float32"),   # exact mode
                                    scheduler=SchedulerConfig(max_num_batched_tokens=64)))
    assert engine.task == "embed" and engine.max_model_len == 64
    token_ids = _token_ids(engine)
    assert max(len(ids) for ids in token_ids) > 32 and sum(len(ids) for ids in token_ids) > 2 * 64
    got, step_sizes = _embed_all(engine, token_ids)
    # no sentence-transformers files: a bare BertModel, CLS vector normalised (vLLM's default)
    want = reference_embeddings(path, token_ids, pooling or "cls", normalize)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert len(step_sizes) >= 3 and max(step_sizes) >= 3   # batched, over several steps, never split
    if normalize:
        torch.testing.assert_close(got.norm(dim=1), torch.ones(len(token_ids)))


def test_tiny_roberta_equals_transformers(tmp_path):
    path = make_tiny_bert(str(tmp_path / "roberta"), arch="roberta", pooling="mean")
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype="float32")))   # exact mode
    assert engine.max_model_len == 128 - 1                   # the position table's first row is the pad slot
    token_ids = _token_ids(engine)
    got, _ = _embed_all(engine, token_ids)
    torch.testing.assert_close(got, reference_embeddings(path, token_ids, "mean", True), atol=2e-5, rtol=1e-4)


def test_encoder_refuses_generation_and_too_long_input(tmp_path):
    path = make_tiny_bert(str(tmp_path / "bert"))
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path)))
    with pytest.raises(ValueError, match="embeddings only"):
        engine.add_request("g", [2, 5, 3], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError):
        engine.add_pooling_request("long", [5] * (engine.max_model_len + 1))
    with pytest.raises(ValueError, match="cannot generate"):
        LLMEngine(EngineConfig(model=ModelConfig(model=path, task="generate")))


def test_task_resolution(tmp_path, tiny_models):
    bert = make_tiny_bert(str(tmp_path / "bert"))
    assert resolve_task("auto", bert) == "embed"
    assert resolve_task("auto", tiny_models["llama"]) == "generate"
    assert resolve_task("embed", tiny_models["llama"]) == "embed"
    with pytest.raises(ValueError):
        resolve_task("classify", bert)


def test_pooling_config_from_sentence_transformers_files(tmp_path):
    path = make_tiny_bert(str(tmp_path / "bert"), pooling="cls", normalize=False)
    cfg = load_pooling_config(path)
    assert (cfg.mode, cfg.normalize, cfg.matryoshka_dimensions) == ("cls", False, None)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"pooling_mode_mean_sqrt_len_tokens": True}, f)
    with pytest.raises(ValueError, match="not supported"):
        load_pooling_config(path)
    minilm = minilm_path()
    if minilm is not None:
        cfg = load_pooling_config(minilm)
        assert (cfg.mode, cfg.normalize, cfg.max_seq_length) == ("mean", True, 256)


def test_encoder_sleep_wake_and_weight_update(tmp_path):
    path = make_tiny_bert(str(tmp_path / "bert"))
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path)))
    token_ids = _token_ids(engine)[:3]
    before, _ = _embed_all(engine, token_ids)
    engine.executor.sleep(2)
    assert engine.runner.model is None
    engine.executor.wakeup()
    torch.testing.assert_close(_embed_all(engine, token_ids)[0], before, atol=0, rtol=0)
    # a partial update (one tensor, HF name) changes the vectors; the packed matmul copies follow it
    name = "encoder.layer.0.intermediate.dense.weight"
    engine.executor.update_weights({name: torch.zeros(64, 32)})
    after, _ = _embed_all(engine, token_ids)
    assert not torch.allclose(after, before, atol=1e-3)
    with pytest.raises(KeyError):
        engine.executor.update_weights({"encoder.layer.9.output.dense.weight": torch.zeros(32, 64)})
