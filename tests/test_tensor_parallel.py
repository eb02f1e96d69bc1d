"""Tensor parallelism (--tp) on CPU with gloo: 2 processes (the CI machine has 2 cores, one thread per rank).

tp=2 greedy output must equal tp=1 token for token with logprobs within 1e-4 (the reference is the unsplit model,
itself checked against transformers in test_engine.py); the server must fail cleanly when a worker dies, leave no
process behind, and two `lmserve` processes with --nnodes 2 must form one engine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from lmserve.config import CacheConfig, DistributedConfig, EngineConfig, ModelConfig, TPConfigError
from lmserve.engine.distributed import decode_batch, encode_batch
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.model_runner import StepBatch
from lmserve.model.loader import load_arch_config
from lmserve.model.parallel import kv_head_start, num_local_kv_heads, shard_spec, validate_tp
from lmserve.sampling_params import SamplingParams
from model_builders import make_random_model
from tests.conftest import API_SERVER_ARGS, start_api_server

PROMPTS = [[1, 5 + i, 17 * i + 3, 99, 1000 + i, 7 * i + 200] for i in range(8)]
GREEDY = SamplingParams(max_tokens=32, temperature=0, logprobs=2, ignore_eos=True)


def _generate(path: str, tp: int, prompts=PROMPTS, params=GREEDY, **model_kw):
    model_kw = {"dtype": "float32", **model_kw}   # exact mode: tp=2 must equal tp=1 to 1e-4
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, **model_kw), cache=CacheConfig(num_blocks=64),
                                    tp=tp))
    try:
        return engine.generate(prompts, params)
    finally:
        engine.shutdown()


def _assert_same(ref, got, tol=1e-4):
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(x.logprob - y.logprob) < tol
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


# ---- pure logic: no processes ---------------------------------------------------------------------------------
def test_batch_wire_format_round_trip():
    b = StepBatch(input_ids=[5, 6, 7, 8], positions=[0, 1, 2, 9], slot_mapping=[16, 17, 18, 41],
                  decode_rows=[3], decode_ctx=[10], decode_tables=[[2, 3]], prefill=[(0, 3, 0, [1])],
                  logit_rows=[2, 3])
    assert decode_batch(encode_batch(b)) == b
    assert decode_batch(encode_batch(StepBatch())) == StepBatch()


def test_shards_cover_the_full_tensors(tiny_models):
    import dataclasses
    cfg = load_arch_config(tiny_models["llama"])          # 4 heads, 2 kv heads, intermediate 128
    starts = {}
    for rank in range(2):
        c = dataclasses.replace(cfg, tp_rank=rank, tp_size=2)
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                     "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
                     "model.embed_tokens.weight"):
            starts.setdefault(name, []).append(shard_spec(name, c))
        assert shard_spec("model.layers.0.input_layernorm.weight", c) is None
    hd = cfg.head_dim
    assert starts["model.layers.0.self_attn.q_proj.weight"] == [(0, 0, 2 * hd), (0, 2 * hd, 2 * hd)]
    assert starts["model.layers.0.self_attn.k_proj.weight"] == [(0, 0, hd), (0, hd, hd)]
    assert starts["model.layers.0.self_attn.o_proj.weight"] == [(1, 0, 2 * hd), (1, 2 * hd, 2 * hd)]
    assert starts["model.layers.0.mlp.down_proj.weight"] == [(1, 0, 64), (1, 64, 64)]
    # replication: 4 ranks over 2 kv heads -> ranks 0,1 hold head 0 and ranks 2,3 head 1
    four = [dataclasses.replace(cfg, tp_rank=r, tp_size=4) for r in range(4)]
    assert [kv_head_start(c) for c in four] == [0, 0, 1, 1] and num_local_kv_heads(four[0]) == 1
    with pytest.raises(TPConfigError, match="attention heads"):
        validate_tp(cfg, 3)


def test_loader_reads_only_each_ranks_slice(tiny_models):
    """Sliced reads (safetensors get_slice) give exactly the slices of the full tensors, padding included."""
    import dataclasses

    import torch
    from lmserve.model.loader import load_state_dict
    from lmserve.model.parallel import shard_tensor
    path = tiny_models["qwen2"]                          # tied embedding, q/k/v biases
    full, cfg = load_state_dict(path), load_arch_config(path)
    for rank in range(2):
        part = load_state_dict(path, torch.float32, rank, 2)
        c = dataclasses.replace(cfg, tp_rank=rank, tp_size=2)
        assert part.keys() == full.keys()
        for name, tensor in full.items():
            assert torch.equal(part[name], shard_tensor(name, tensor, c)), name
    assert part["model.layers.0.self_attn.q_proj.weight"].shape[0] == 2 * cfg.head_dim


def test_distributed_config_errors():
    with pytest.raises(ValueError, match="nodes"):
        EngineConfig(tp=3, distributed=DistributedConfig(nnodes=2, master_port=29500))
    with pytest.raises(ValueError, match="master_port"):
        DistributedConfig(nnodes=2)
    with pytest.raises(ValueError, match="node_rank"):
        DistributedConfig(nnodes=2, node_rank=2, master_port=29500)


# ---- engines: 2 processes -------------------------------------------------------------------------------------
def test_tp2_matches_tp1_llama(tiny_models):
    _assert_same(_generate(tiny_models["llama"], 1), _generate(tiny_models["llama"], 2))


def test_tp_refuses_a_split_that_does_not_divide_the_heads(tiny_models):
    with pytest.raises(TPConfigError, match="does not divide the model's 4 attention heads"):
        _generate(tiny_models["llama"], 3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_tp2_matches_tp1(tiny_models, arch):
    _assert_same(_generate(tiny_models[arch], 1), _generate(tiny_models[arch], 2))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "llama3"])
def test_tp2_matches_tp1_more_archs(arch, tmp_path):
    """qwen3: q/k norms per head; llama3: llama3 RoPE scaling, a 128256-token tied vocabulary."""
    from tests.arch_models import make_arch_model
    path = make_arch_model(arch, str(tmp_path / arch))
    _assert_same(_generate(path, 1), _generate(path, 2))


def test_tp_refuses_an_architecture_it_does_not_split(tmp_path):
    from tests.arch_models import make_arch_model
    path = make_arch_model("mixtral", str(tmp_path / "mixtral"))
    with pytest.raises(TPConfigError, match="mixtral models are not split yet"):
        _generate(path, 2)


@pytest.mark.slow
def test_tp2_control_messages_reach_every_rank(tiny_models):
    """sleep (level 2) / wakeup and weight updates run on every rank: afterwards tp=2 still equals tp=1."""
    import torch
    gen = torch.Generator().manual_seed(1)
    update = {"model.norm.weight": torch.rand(64, generator=gen) + 0.5,
              "model.layers.1.mlp.down_proj.weight": torch.randn(64, 128, generator=gen) * 0.1,   # row-parallel
              "model.layers.0.self_attn.k_proj.weight": torch.randn(32, 64, generator=gen) * 0.1}  # split heads
    results = {}
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=tiny_models["llama"], dtype="float32"),
                                        cache=CacheConfig(num_blocks=64), tp=tp))
        try:
            before = engine.generate(PROMPTS[:3], GREEDY)
            engine.executor.sleep(2)
            engine.executor.wakeup()
            engine.block_manager.reset_prefix_cache()
            _assert_same(before, engine.generate(PROMPTS[:3], GREEDY))
            with pytest.raises(KeyError):
                engine.executor.update_weights({"model.no_such.weight": torch.zeros(3)})
            engine.executor.update_weights(update)
            engine.block_manager.reset_prefix_cache()
            results[tp] = engine.generate(PROMPTS[:3], GREEDY)
            assert [o.outputs[0].token_ids for o in results[tp]] != [o.outputs[0].token_ids for o in before]
        finally:
            engine.shutdown()
    _assert_same(results[1], results[2])


@pytest.mark.slow
def test_tp2_replicates_a_single_kv_head(tmp_path):
    path = make_random_model("llama", str(tmp_path / "kv1"), num_key_value_heads=1, seed=3)
    _assert_same(_generate(path, 1), _generate(path, 2))


@pytest.mark.slow
def test_tp2_pytorch_attention_and_prompt_logprobs(tiny_models):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    ref = _generate(tiny_models["qwen2"], 1, PROMPTS[:3], params, attention_backend="torch")
    got = _generate(tiny_models["qwen2"], 2, PROMPTS[:3], params, attention_backend="torch")
    _assert_same(ref, got)
    for a, b in zip(ref, got):
        assert [p.token_id for p in a.prompt_logprobs[1:]] == [p.token_id for p in b.prompt_logprobs[1:]]
        assert all(abs(p.logprob - q.logprob) < 1e-4 for p, q in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]))


@pytest.mark.slow
def test_smollm2_gguf_tp3_matches_tp1(smollm2_path):
    """SmolLM2-135M has 9 query and 3 KV heads: 2 does not divide them, 3 does (3 processes on 2 cores: slow)."""
    prompts = PROMPTS[:4]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=2, ignore_eos=True)
    # GGUF blocks where the quantized-matmul kernel exists (each rank on its own blocks; auto), and float weights
    for weights in ("auto", "float"):
        ref = _generate(smollm2_path, 1, prompts, params, weights=weights)
        _assert_same(ref, _generate(smollm2_path, 3, prompts, params, weights=weights))


# ---- the HTTP server --------------------------------------------------------------------------------------------
def _completion(url: str, prompt: str, max_tokens: int = 24) -> dict:
    from openai import OpenAI
    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1)
    return {"text": r.choices[0].text, "logprobs": r.choices[0].logprobs.token_logprobs}


def _descendants(proc) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _is_worker(p: psutil.Process) -> bool:
    return "spawn_main" in " ".join(p.cmdline())     # a multiprocessing "spawn" child (not its resource tracker)


def _wait_gone(procs: list[psutil.Process], timeout: float = 20) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.fixture(scope="module")
def tp1_server(tiny_models, tmp_path_factory):
    """The tp=1 reference api_server on the tiny llama, shared by the server tests below (one start, not two)."""
    server = start_api_server(tmp_path_factory.mktemp("tp1"), tiny_models["llama"], *API_SERVER_ARGS)
    yield server
    server.stop()


@pytest.mark.slow
def test_server_tp2_matches_tp1_and_reports_tp(tiny_models, tmp_path, tp1_server):
    path = tiny_models["llama"]
    prompts = ["The capital of France is", "1, 2, 3,", "Once upon a time"]
    ref = [_completion(tp1_server.url, p) for p in prompts]
    two = start_api_server(tmp_path, path, "--tp", "2", *API_SERVER_ARGS)
    workers = _descendants(two.proc)
    try:
        assert any(_is_worker(w) for w in workers)
        got = [_completion(two.url, p) for p in prompts]
        models = httpx.get(f"{two.url}/v1/models").json()
        assert models["data"][0]["tp"] == 2
        assert "tp: 2" in httpx.get(f"{two.url}/stats").json()
        assert httpx.get(f"{two.url}/verbose_stats").json()["tp"] == 2
    finally:
        two.stop()
    for a, b in zip(ref, got):
        assert a["text"] == b["text"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4
    assert not _wait_gone(workers), "tensor-parallel workers outlived the server (SIGTERM)"


@pytest.mark.slow
def test_killed_worker_fails_requests_and_health(tiny_models, tmp_path):
    server = start_api_server(tmp_path, tiny_models["llama"], "--tp", "2", *API_SERVER_ARGS)
    workers = _descendants(server.proc)
    try:
        assert any(_is_worker(w) for w in workers)
        from openai import APIError, OpenAI
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        stream = client.completions.create(model=model, prompt="Count:", max_tokens=1500, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))                                      # generation is under way
        t0 = time.monotonic()
        for w in workers:
            if _is_worker(w):
                w.send_signal(signal.SIGKILL)
        with pytest.raises((APIError, httpx.HTTPError)):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 15
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/health").status_code == 503
        r = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                       timeout=30)
        assert r.status_code in (500, 503) and "error" in r.json()
    finally:
        server.stop()
    assert not _wait_gone(workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_form_one_engine(tiny_models, tmp_path, tp1_server):
    path = tiny_models["llama"]
    port = _free_port()
    node_args = ("--tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port))
    log = open(tmp_path / "node1.log", "w")
    node1 = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "api_server", path, *node_args,
                              "--node-rank", "1", *API_SERVER_ARGS], stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        node0 = start_api_server(tmp_path, path, *node_args, "--node-rank", "0", *API_SERVER_ARGS)
        try:
            assert _descendants(node0.proc) == []                # node 0's only rank is itself
            out = _completion(node0.url, "The capital of France is", 8)
            assert out["text"]
            assert httpx.get(f"{node0.url}/v1/models").json()["data"][0]["tp"] == 2
        finally:
            node0.stop()
        assert node1.wait(30) == 0                                 # the driver's shutdown reached node 1
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    assert _completion(tp1_server.url, "The capital of France is", 8)["text"] == out["text"]


@pytest.mark.slow
def test_torchrun_ranks_form_one_engine(tiny_models, tmp_path):
    """One process per rank from a launcher: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from torchrun."""
    port, http_port = _free_port(), _free_port()
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), "-m", "lmserve", "serve", "api_server", tiny_models["llama"],
         "--server-name", "127.0.0.1", "--server-port", str(http_port), *API_SERVER_ARGS],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["tp"] == 2
        assert _completion(url, "The capital of France is", 8)["text"]
    finally:
        ranks = _descendants(proc)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not _wait_gone(ranks)


def test_tp_not_dividing_the_heads_is_one_clear_line(tiny_models):
    r = subprocess.run([sys.executable, "-m", "lmserve", "serve", "api_server", tiny_models["llama"], "--tp", "3",
                        "--server-port", str(_free_port()), *API_SERVER_ARGS], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "api_server: tp: 3 does not divide the model's 4 attention heads"


def test_master_port_in_use_is_one_clear_line(tiny_models, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "lmserve", "serve", "api_server", tiny_models["llama"], "--tp", "2",
                            "--master-port", str(port), "--server-port", str(_free_port()), *API_SERVER_ARGS],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("api_server: tensor parallelism: rank 0 cannot join") and "Traceback" not in r.stderr
