"""--generation-config auto|none|PATH: sampling defaults from the model fill the fields a request leaves out, on
every endpoint that samples; a field the request sets always wins."""
import json
import re
import subprocess
import sys

import gguf
import httpx
import openai
import pytest

from lmserve.generation_config import load_generation_defaults
from lmserve.server.protocol import ChatCompletionRequest, GenerateRequest
from lmserve.server.serving_common import with_generation_defaults
from tests.conftest import start_api_server

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


# ---- where the defaults come from -------------------------------------------------------------------------------
def test_auto_on_the_bundled_gguf_uses_the_model_card(smollm2_path):
    defaults, source = load_generation_defaults(smollm2_path, "auto")
    assert defaults == {"temperature": 0.2, "top_p": 0.9}     # SmolLM2's model card
    assert "smollm2 model card" in source


def test_auto_on_a_gguf_reads_its_sampling_metadata(tmp_path):
    path = str(tmp_path / "meta.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.basename", "smollm2")                # the embedded metadata beats the model card
    w.add_float32("general.sampling.temp", 0.6)
    w.add_uint32("general.sampling.top_k", 20)
    w.add_float32("general.sampling.penalty_repeat", 1.25)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    defaults, source = load_generation_defaults(path, "auto")
    assert defaults == {"temperature": pytest.approx(0.6), "top_k": 20, "repetition_penalty": 1.25}
    assert "general.sampling" in source


def test_auto_on_an_hf_directory_reads_generation_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_generation_defaults(str(tmp_path), "auto")[0] == {}      # no file: no defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0}))
    assert load_generation_defaults(str(tmp_path), "auto") == (
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}, str(tmp_path / "generation_config.json"))


def test_none_and_path(tmp_path, smollm2_path):
    assert load_generation_defaults(smollm2_path, "none")[0] == {}
    f = tmp_path / "gen.json"
    f.write_text(json.dumps({"temperature": 0.3, "repetition_penalty": 1.1, "max_new_tokens": 5}))
    assert load_generation_defaults(smollm2_path, str(f))[0] == {"temperature": 0.3, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 7}))
    assert load_generation_defaults(smollm2_path, str(tmp_path))[0] == {"top_k": 7}   # a directory holding one
    with pytest.raises(ValueError, match="generation_config"):
        load_generation_defaults(smollm2_path, str(tmp_path / "missing.json"))
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_generation_defaults(smollm2_path, str(f))


def test_request_fields_win_over_defaults():
    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 3}
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "temperature": 1.0,
                                                "top_p": None})
    filled = with_generation_defaults(req, defaults)
    assert (filled.temperature, filled.top_p, filled.top_k) == (1.0, 0.9, 3)   # set / null -> default / unset
    assert filled.min_p == 0.0 and filled.repetition_penalty == 1.0           # no default: the protocol's own
    assert with_generation_defaults(req, {}) is req
    gen = with_generation_defaults(GenerateRequest.model_validate({"prompt": "x", "top_k": 0}), defaults)
    assert (gen.temperature, gen.top_k) == (0.2, 0)


def test_a_bad_path_fails_before_loading_the_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmserve", "serve", "api_server", "--generation-config",
                          str(tmp_path / "nope.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "generation_config" in out.stderr and "nope.json" in out.stderr


# ---- end to end: a server whose defaults make sampling greedy (top_k 1) -----------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    gen = tmp_path_factory.mktemp("gen") / "generation_config.json"
    gen.write_text(json.dumps({"temperature": 1.0, "top_k": 1}))
    srv = start_api_server(tmp_path_factory.mktemp("server"), tiny_models["llama"], "--generation-config",
                           str(gen), "--cache-block-count", "128", "--log-level", "INFO")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")


def test_start_up_says_what_it_is_doing(server):
    log = server.log_tail(100_000)
    port = server.url.rsplit(":", 1)[1]
    assert "generation defaults from " in log and "temperature=1.0, top_k=1" in log
    for line in (r"loading the tokenizer \(\d+\.\d s\)", r"loading weights: \d+M parameters, torch.float32 on cpu \(\d+\.\d s\)",
                 r"allocating the KV cache \(\d+\.\d s\)",
                 rf"ready at http://127.0.0.1:{port} .*start-up took \d+\.\d s"):
        assert re.search(line, log), (line, log)
    # the phases come in the order they run
    order = [log.index(s) for s in ("generation defaults", "loading the tokenizer", "loading weights", "ready at")]
    assert order == sorted(order)


def test_models_shows_the_defaults(oai):
    (card,) = oai.models.list().data
    assert card.model_extra["generation_defaults"] == {"temperature": 1.0, "top_k": 1}


def test_chat_and_completions_defaults_and_overrides(oai):
    model = oai.models.list().data[0].id
    greedy = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    # no top_k in the request: the model's top_k=1 makes every seed greedy
    for seed in (1, 2):
        out = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, seed=seed)
        assert out.choices[0].message.content == greedy.choices[0].message.content
    # top_k set by the request wins: seeds now sample differently (random tiny weights: a flat distribution)
    texts = {oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, seed=seed,
                                         extra_body={"top_k": 0}).choices[0].message.content for seed in (1, 2, 3)}
    assert len(texts) > 1
    g = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    s = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=12, seed=5)
    assert s.choices[0].text == g.choices[0].text
    s = [oai.completions.create(model=model, prompt="Once upon a time", max_tokens=12, seed=seed,
                                extra_body={"top_k": 0}).choices[0].text for seed in (1, 2, 3)]
    assert len(set(s)) > 1


def test_generate_and_interactive_defaults_and_overrides(server):
    def gen(**kw):
        return httpx.post(f"{server.url}/generate", json={"prompt": "Once upon a time", "max_tokens": 12, **kw},
                          timeout=60).json()["text"]

    greedy = gen(temperature=0)
    assert gen(seed=1) == gen(seed=2) == greedy
    assert len({gen(seed=s, top_k=0) for s in (1, 2, 3)}) > 1

    def interactive(**kw):
        return httpx.post(f"{server.url}/v1/chat/interactive",
                          json={"prompt": "Tell me a story.", "request_output_len": 12, **kw}, timeout=60).json()["text"]

    greedy = interactive(temperature=0)
    assert interactive(seed=1) == interactive(seed=2) == greedy
    assert len({interactive(seed=s, top_k=0) for s in (1, 2, 3)}) > 1
