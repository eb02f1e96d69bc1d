"""Serving LoRA adapters (engine/lora_manager.py, server/serving_lora.py) on a real api_server: peft makes the
adapters (random, non-zero B); greedy tokens equal transformers + peft for the base and each adapter, on a tiny
random llama (float weights) and on SmolLM2 (GGUF blocks, the quantized linear path); a concurrent batch mixing
adapters gives each request its solo tokens; the prefix cache never serves one adapter's KV to another; runtime
load / use / unload / 404."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from conftest import start_api_server

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["The quick brown fox jumps over the lazy dog, and then", "Once upon a time in a small village",
           "def fibonacci(n):"]
LONG = "In the beginning the library kept every book it had ever been given, shelf after shelf, " * 2
NEW_TOKENS = 8
# NOTE: the PyTorch op references: the LoRA hook sits after whichever LinearMethod runs, and these servers then
# start without waiting on a C++ kernel build
SERVER_ARGS = ("--kernels", "torch")


def make_adapter(base_dir: str, path: str, seed: int, r: int = 4, alpha: int = 8, scale: float = 0.1) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:        # peft starts B at zero (a no-op adapter): make it do something
                p.normal_(0, scale)
    pm.save_pretrained(path)


@torch.inference_mode()
def greedy(model, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def references(base_dir: str, adapters: dict[str, str], prompts: list[list[int]]) -> dict[str, list[list[int]]]:
    """model name -> greedy tokens per prompt, by transformers (+ peft, unmerged; merged checked once too)."""
    def base():
        return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    out = {"base": [greedy(base(), p) for p in prompts]}
    for name, path in adapters.items():
        pm = peft.PeftModel.from_pretrained(base(), path).eval()
        out[name] = [greedy(pm, p) for p in prompts]
    merged = peft.PeftModel.from_pretrained(base(), next(iter(adapters.values()))).merge_and_unload().eval()
    assert greedy(merged, prompts[0]) == out[next(iter(adapters))][0]
    return out


def generate(url: str, ids: list[int], model: str | None, n: int = NEW_TOKENS) -> list[int]:
    body = {"input_ids": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    if model is not None:
        body["adapter_name"] = model
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def prefix_hits(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("lmserve:prefix_cache_hits_total "):
            return float(line.split()[-1])
    raise AssertionError("no prefix_cache_hits metric")


@pytest.fixture(scope="module")
def tiny_setup(tiny_models, tmp_path_factory):
    base = tiny_models["llama"]
    root = tmp_path_factory.mktemp("lora_serving")
    adapters = {name: str(root / name) for name in ("a", "b", "c")}
    for seed, path in enumerate(adapters.values(), 1):
        make_adapter(base, path, seed, scale=0.5)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    prompts = [tok.encode(p) for p in PROMPTS + [LONG]]
    refs = references(base, adapters, prompts)
    for name in adapters:
        assert refs[name] != refs["base"], f"adapter {name} changes nothing: the test could not fail"
    server = start_api_server(root, base, *SERVER_ARGS, "--lora-modules", f"a={adapters['a']}",
                              json.dumps({"name": "b", "path": adapters["b"], "base_model_name": "tiny"}),
                              "--enable-lora-runtime-updates", "--max-lora-rank", "8")
    try:
        yield server, adapters, prompts, refs
    finally:
        server.stop()


def test_models_list_adapters_and_greedy_equals_peft(tiny_setup):
    server, adapters, prompts, refs = tiny_setup
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    cards = {m.id: m for m in client.models.list().data}
    base_name = next(m for m in cards if m not in ("a", "b"))
    assert set(cards) == {base_name, "a", "b"}
    assert cards["a"].parent == base_name and cards["a"].root == adapters["a"]
    assert cards["b"].parent == "tiny"
    for name in ("base", "a", "b"):
        for ids, want in zip(prompts[:-1], refs[name]):      # the long prompt is the prefix-cache test's
            assert generate(server.url, ids, None if name == "base" else name) == want, name
    # the OpenAI doors pick the adapter by `model`: completions with token ids, and chat runs on it
    for name in ("a", "b"):
        text = client.completions.create(model=name, prompt=prompts[0], max_tokens=NEW_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
        base_text = client.completions.create(model=base_name, prompt=prompts[0], max_tokens=NEW_TOKENS,
                                              temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        want = httpx.post(f"{server.url}/generate", json={"input_ids": prompts[0], "max_tokens": NEW_TOKENS,
                          "temperature": 0, "ignore_eos": True, "model": name}).json()["text"]
        assert text == want and text != base_text
        assert client.completions.create(model=name, prompt=prompts[0], max_tokens=1).model == name   # as vLLM
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="LoRA adapter"):
        client.embeddings.create(model="a", input="x")


def test_mixed_batch_equals_solo_runs(tiny_setup):
    server, _, prompts, refs = tiny_setup
    jobs = [(name, i) for i in range(len(prompts) - 1) for name in ("a", "base", "b")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: generate(server.url, prompts[j[1]], None if j[0] == "base" else j[0]), jobs))
    for (name, i), tokens in zip(jobs, got):
        assert tokens == refs[name][i], (name, i)


def test_prefix_cache_does_not_cross_adapters(tiny_setup):
    server, _, prompts, refs = tiny_setup
    long_ids = prompts[-1]
    assert len(long_ids) > 2 * 16           # full KV blocks that could be shared
    assert generate(server.url, long_ids, "a") == refs["a"][-1]     # the first use of this prompt: a's blocks cached
    before = prefix_hits(server.url)
    assert generate(server.url, long_ids, "b") == refs["b"][-1]
    assert prefix_hits(server.url) == before, "adapter b was served adapter a's cached KV"
    assert generate(server.url, long_ids, "a") == refs["a"][-1]
    assert prefix_hits(server.url) > before, "the same adapter should hit its own cached prefix"


def test_runtime_load_use_unload(tiny_setup):
    server, adapters, prompts, refs = tiny_setup
    url = server.url
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": adapters["c"]})
    assert r.status_code == 200 and "added successfully" in r.text
    assert generate(url, prompts[0], "c") == refs["c"][0]
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": adapters["c"]})
    assert r.status_code == 400 and "already been loaded" in r.text
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "/nonexistent"})
    assert r.status_code == 400 and "not found" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "d"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"})
    assert r.status_code == 200 and "removed successfully" in r.text
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "c", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404
    assert "c" not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert generate(url, prompts[0], "a") == refs["a"][0]      # the others are untouched


@pytest.mark.slow
def test_smollm2_gguf_adapters_equal_peft(smollm2_path, tmp_path):
    """The quantized (GGUF blocks) linear path: the delta is added after the quantized matmul."""
    from lmserve.hf_export import export_hf
    hf_dir = export_hf(smollm2_path, str(tmp_path / "hf"))
    adapters = {name: str(tmp_path / name) for name in ("x", "y")}
    for seed, path in enumerate(adapters.values(), 1):
        make_adapter(hf_dir, path, seed, r=8, alpha=16, scale=0.05)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompts = [tok.encode(PROMPTS[0])]
    refs = references(hf_dir, adapters, prompts)
    assert refs["x"] != refs["base"] and refs["y"] != refs["base"]
    # NOTE: the C++ quantized-matmul kernel: on the PyTorch reference GGUF blocks are far too slow for a test
    server = start_api_server(tmp_path, smollm2_path, "--weights", "quantized", "--adapters",
                              *(f"{n}={p}" for n, p in adapters.items()))
    try:
        for name in ("base", "x", "y"):
            assert generate(server.url, prompts[0], None if name == "base" else name) == refs[name][0], name
    finally:
        server.stop()


def test_priority_reaches_responses_and_messages():
    """Issue 23's last piece: `priority` on /v1/responses and /v1/messages goes into the chat request they become."""
    from lmserve.server.messages_input import to_chat_request as messages_to_chat
    from lmserve.server.protocol.anthropic import MessagesRequest
    from lmserve.server.protocol.responses import ResponsesRequest
    from lmserve.server.responses_input import to_chat_request as responses_to_chat
    chat, _ = responses_to_chat(ResponsesRequest(input="hi", priority=-3), "m", [])
    assert chat.priority == -3
    chat = messages_to_chat(MessagesRequest(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                            priority=5), "m")
    assert chat.priority == 5
