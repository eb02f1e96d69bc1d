"""Bad input against a real api_server: every error is OpenAI-shaped, names the field, and the server keeps serving."""
from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def model(url) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def _error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_unknown_model_is_404(url, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    _error(httpx.post(f"{url}/v1/completions", json={"model": "x", "prompt": "hi"}), 404, "model")
    _error(httpx.post(f"{url}/v1/embeddings", json={"model": "x", "input": "hi"}), 404, "model")


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0), ("max_tokens", -3),
    ("max_completion_tokens", 0), ("top_k", -5), ("min_p", 2.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("top_logprobs", 50), ("logit_bias", {"x": 1}),
    ("logit_bias", {"999999999": 1.0}), ("temperature", "hot"), ("n", "many"), ("stop", 5)])
def test_bad_chat_parameter_is_400_naming_it(url, model, field, value):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    _error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, field)


def test_bad_completion_parameters(url, model):
    post = lambda **kw: httpx.post(f"{url}/v1/completions", json={"model": model, "max_tokens": 2, **kw})  # noqa
    _error(post(prompt="hi", temperature=-1), 400, "temperature")
    _error(post(prompt="hi", logprobs=21), 400, "logprobs")
    _error(post(prompt=[1, 2, "x"]), 400, "prompt")
    _error(post(prompt=[[1, 2], [10**9]]), 400, "prompt[1]")
    _error(post(prompt=""), 400, "prompt")
    _error(post(prompt="hi", max_tokens=0), 400, "max_tokens")   # 0 is only allowed with echo
    _error(post(prompt="hi", n=2, best_of=3), 400, "best_of")


def test_prompt_longer_than_the_session_is_400(url, client, model):
    long_text = "hello " * 2100
    _error(httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": long_text}), 400, "prompt")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": long_text}])
    assert info.value.body["param"] == "messages"
    _error(httpx.post(f"{url}/generate", json={"prompt": long_text}), 400, "prompt")


def test_malformed_and_missing_fields_are_400(url, model):
    resp = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                      headers={"content-type": "application/json"})
    assert _error(resp, 400)["code"] == "invalid_json"
    _error(httpx.post(f"{url}/v1/chat/completions", json={"model": model}), 400, "messages")
    _error(httpx.post(f"{url}/v1/chat/completions", json={"messages": "hi"}), 400, "model")
    _error(httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": []}), 400, "messages")
    _error(httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": [{"content": "x"}]}), 400,
           "messages[0].role")
    _error(httpx.post(f"{url}/generate", json={"max_tokens": 3}), 400, "prompt")
    _error(httpx.post(f"{url}/generate", json={"input_ids": [10**9]}), 400, "input_ids")


@pytest.mark.parametrize("extra, param", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
])
def test_unsupported_chat_fields_are_400_not_ignored(url, model, extra, param):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    err = _error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, param)
    assert "not supported" in err["message"] and err["code"] == "not_supported"


def test_unsupported_completion_and_generate_fields(url, client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="hi", suffix="bye", max_tokens=2)
    assert info.value.body["param"] == "suffix"
    _error(httpx.post(f"{url}/generate", json={"prompt": "hi", "image_data": "x.png"}), 400, "image_data")
    _error(httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "hi", "dimensions": 8}), 400,
           "dimensions")


def test_unknown_route_and_method_are_openai_shaped(url):
    _error(httpx.get(f"{url}/v1/nothing"), 404)
    _error(httpx.get(f"{url}/v1/chat/completions"), 405)


def test_terminate_needs_the_flag(url):
    err = _error(httpx.get(f"{url}/terminate"), 403)
    assert err["code"] == "terminate_not_allowed"
    assert httpx.get(f"{url}/health").status_code == 200


def test_server_keeps_serving_after_errors(client, model):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         temperature=0)
    assert out.choices[0].message.content
