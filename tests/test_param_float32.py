"""Sampling values are validated as the engine holds them (float32), on every door (issue 25).

top_p=1e-217 is > 0 as a Python float but 0.0 in a float32 tensor; it used to pass validation, make the sampler
gather index -1 and kill the engine thread for every later request."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from lmserve.engine.sampler import Sampler, SamplingMetadata
from lmserve.engine.sequence import Sequence
from lmserve.generation_config import GenerationConfig
from lmserve.sampling_params import SamplingParams, SamplingParamsError, as_float32

pytestmark = pytest.mark.timeout(300)

# (field, value, what the engine must do): "400" = rejected naming the field; "greedy" = answered, and the answer is
# the greedy one (the value leaves only the top token)
HOSTILE = [
    ("top_p", 1e-300, "400"), ("top_p", 1e-45, "greedy"), ("top_p", 5e-324, "400"),
    ("top_p", 1.0797110621544861e-217, "400"),       # the fuzzer's value from the issue
    ("min_p", 1 - 1e-12, "greedy"), ("temperature", 1e-45, "greedy"), ("temperature", 1e300, "400"),
    ("repetition_penalty", 1e-300, "400"), ("repetition_penalty", 1e300, "400"),
]


def test_as_float32_rounds_like_a_tensor():
    for x in (1e-300, 1e-45, 5e-324, 1 - 1e-12, 0.1, 3e38, -1e-40):
        assert as_float32(x) == torch.tensor(x, dtype=torch.float32).item()
    assert as_float32(1e300) == float("inf") and as_float32(-1e300) == float("-inf")


@pytest.mark.parametrize("field, value, expect", HOSTILE)
def test_sampling_params_checks_the_float32_value(field, value, expect):
    if expect == "400":
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(**{field: value})
        assert e.value.param == field and "float32" in str(e.value)
    else:
        SamplingParams(**{field: value})


def test_offline_pipeline_door_uses_the_same_rule():
    with pytest.raises(SamplingParamsError, match="top_p"):
        GenerationConfig(do_sample=True, top_p=1e-300).to_sampling_params()
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams(logit_bias={3: 1e300})
    with pytest.raises(SamplingParamsError, match="top_k"):
        SamplingParams(top_k=2.5)
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1.0}).validate_vocab(100)


def test_sampler_keeps_one_token_whatever_top_p_holds():
    """The second guard: even a top_p of 0.0 (or NaN) in the tensor keeps the best token, never index -1."""
    seq = Sequence(0, "r", [1, 2, 3], SamplingParams(temperature=1.0, top_p=0.5))
    logits = torch.randn(1, 300)
    best = int(logits.argmax())
    for top_p in (0.0, float("nan"), 1e-45):
        md = SamplingMetadata.from_sequences([seq], 300, torch.device("cpu"))
        md.top_p = torch.tensor([top_p])
        assert Sampler()(logits.clone(), md).sampled_token_ids == [best]


# ---- every HTTP door ---------------------------------------------------------------------------------------------
def _bodies(model: str) -> dict[str, dict]:
    return {
        "/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "Count: 1 2 3"}],
                                 "max_tokens": 4, "temperature": 1.0},
        "/v1/completions": {"model": model, "prompt": "Count: 1 2 3", "max_tokens": 4, "temperature": 1.0},
        "/generate": {"prompt": "Count: 1 2 3", "max_tokens": 4, "temperature": 1.0},
        "/v1/chat/interactive": {"prompt": "Count: 1 2 3", "request_output_len": 4, "temperature": 1.0,
                                 "top_p": 1.0},
    }


def _text(path: str, body: dict) -> str:
    if path == "/v1/chat/completions":
        return body["choices"][0]["message"]["content"]
    if path == "/v1/completions":
        return body["choices"][0]["text"]
    return body["text"]


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=json.dumps(body).encode(), timeout=120,
                      headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", list(_bodies("m")))
def test_hostile_sampling_values_on_every_door(url, model, path):
    base = _bodies(model)[path]
    greedy = _post(url, path, {**base, "temperature": 0.0})
    assert greedy.status_code == 200, greedy.text
    cases = HOSTILE + [("logit_bias", {"42": 1e300}, "400")]
    for field, value, expect in cases:
        r = _post(url, path, {**base, field: value})
        if r.status_code == 400:
            err = r.json()["error"]
            assert field in (err.get("param") or "") or field in err["message"], (path, field, value, err)
        else:
            assert r.status_code == 200, (path, field, value, r.status_code, r.text)
            assert expect != "400" or (field == "logit_bias" and path in ("/generate", "/v1/chat/interactive")), \
                (path, field, value, "accepted", r.text)
            if expect == "greedy":
                assert _text(path, r.json()) == _text(path, greedy.json()), (path, field, value)
        # the engine is still there: the next normal request is served
        after = _post(url, path, base)
        assert after.status_code == 200, (path, field, value, after.text)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_update_weights_with_a_non_tensor_value_is_400(url):
    import base64
    import io
    buf = io.BytesIO()
    torch.save({"model.norm.weight": 3, "lm_head.weight": torch.zeros(2)}, buf)
    r = httpx.post(f"{url}/update_weights", timeout=60, json={
        "serialized_named_tensors": base64.b64encode(buf.getvalue()).decode(), "load_format": "torch"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "serialized_named_tensors"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
