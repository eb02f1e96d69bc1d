"""/tokenize and /detokenize (vLLM's shapes, also under /v1/) on the bundled SmolLM2: a round trip on 50 strings
(unicode included), chat messages counted exactly as /v1/chat/completions counts its prompt, and 400s naming the
field. `agent_url` runs the suite directly and through the proxy."""
from __future__ import annotations

import httpx
import pytest

STRINGS = [
    "Hello, world!", "", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "naïve café résumé",
    "Grüße aus Köln", "日本語のテキスト", "中文测试句子", "한국어 문장", "Привет, мир", "Γειά σου κόσμε",
    "مرحبا بالعالم", "שלום עולם", "हिन्दी वाक्य", "emoji 😀🎉👍🏽", "family 👨‍👩‍👧‍👦", "flags 🇫🇷🇯🇵",
    "math ∑∫√∞ ≠ ≤ ≥", "arrows ← → ↑ ↓", "quotes “curly” ‘single’ «guillemets»", "dashes – — ‒",
    "zero\u200bwidth", "combining e\u0301 a\u0308", "x" * 300, "ab" * 97, "1234567890" * 5, "3.14159 2.71828",
    "<|im_start|>user", "<tag attr=\"v\">text</tag>", "def f(x):\n    return x * 2\n", "{\"json\": [1, 2, 3]}",
    "SELECT * FROM t WHERE a = 'b';", "C:\\path\\to\\file.txt", "http://127.0.0.1:8000/v1?q=1&r=2",
    "ALL CAPS SENTENCE", "MiXeD cAsE", "repeated repeated repeated", "punctuation!!! ??? ...", "#hashtag @mention",
    "€100 £50 ¥1000 ₹20", "½ ¼ ¾", "°C ℃ ℉", "©®™", "smørrebrød", "Ελληνικά και English", "tiếng Việt",
    "ภาษาไทย", "ქართული", "end.",
]
MESSAGES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé? 日本 😀"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
]


@pytest.fixture(scope="module")
def model(agent_url) -> str:
    return httpx.get(f"{agent_url}/v1/models").json()["data"][0]["id"]


def test_fifty_strings_round_trip(agent_url, model):
    assert len(STRINGS) == 50
    with httpx.Client(base_url=agent_url, timeout=60) as http:
        for i, text in enumerate(STRINGS):
            prefix = "/v1" if i % 2 else ""
            r = http.post(f"{prefix}/tokenize", json={"model": model, "prompt": text, "return_token_strs": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
            assert body["max_model_len"] > 0
            back = http.post(f"{prefix}/detokenize", json={"model": model, "tokens": body["tokens"]}).json()
            assert back["prompt"] == text, (text, body)


def test_chat_messages_count_equals_usage_prompt_tokens(agent_url, model):
    with httpx.Client(base_url=agent_url, timeout=120) as http:
        for messages in MESSAGES:
            counted = http.post("/tokenize", json={"model": model, "messages": messages}).json()
            chat = http.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 1})
            assert counted["count"] == chat.json()["usage"]["prompt_tokens"]
            text = http.post("/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"]
            assert text.endswith("assistant\n") and messages[-1]["content"] in text
            bare = http.post("/tokenize", json={"model": model, "messages": messages,
                                                 "add_generation_prompt": False}).json()
            assert bare["count"] < counted["count"]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, None),
    ("/tokenize", {"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role"),
    ("/detokenize", {"tokens": [1, -5]}, "tokens[1]"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens[0]"),
    ("/tokenize", {"model": "nope", "prompt": "a"}, "model"),
])
def test_bad_input_is_4xx(agent_url, path, body, param):
    r = httpx.post(f"{agent_url}{path}", json=body, timeout=60)
    assert r.status_code in (400, 404), r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
