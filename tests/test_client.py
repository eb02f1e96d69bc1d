"""Clients against a real api_server process: APIClient's methods, and the console chats driven through stdin.

The server is the bundled SmolLM2 on CPU. Generation tests use temperature 0, so text comparisons are exact.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lmserve.client import APIClient, APIError, get_model_list
from lmserve.client.api_client import iter_stream_lines
from lmserve.client.chat import PROMPT

TURN_1 = "My favourite colour is green. Say hello."
TURN_2 = "What did I just tell you?"


# ---- stream parsing (no server) ---------------------------------------------------------------------------
def test_iter_stream_lines_sse_ndjson_and_nul():
    sse = [': keep-alive', 'data: {"a": 1}', '', 'event: message', 'data:{"a": 2}', 'data: [DONE]', 'data: {"a": 3}']
    assert list(iter_stream_lines(iter(sse))) == [{"a": 1}, {"a": 2}]
    ndjson = ['{"text": "x", "tokens": 1}', '{"text": "y", "tokens": 2}']
    assert [d["text"] for d in iter_stream_lines(iter(ndjson))] == ["x", "y"]
    assert list(iter_stream_lines(iter(['{"a": 1}\0{"a": 2}\0']))) == [{"a": 1}, {"a": 2}]


def test_api_error_carries_the_openai_error_message():
    e = APIError(404, {"error": {"message": "model 'x' not found", "type": "NotFoundError", "code": 404}})
    assert e.status_code == 404 and "model 'x' not found" in str(e)


# ---- a real server (the shared one from conftest) ---------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(api_server_url):
    with APIClient(api_server_url) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.available_models[0]


def test_available_models_and_get_model_list(client, api_server_url):
    models = client.available_models
    assert models and all(isinstance(m, str) for m in models)
    assert get_model_list(api_server_url) == models
    assert get_model_list(f"{api_server_url}/v1/models") == models


def test_encode(client):
    input_ids, length = client.encode("Hello world")
    assert length == len(input_ids) > 0 and all(isinstance(t, int) for t in input_ids)
    no_bos, no_bos_len = client.encode("Hello world", add_bos=False)
    assert no_bos_len <= length and input_ids[-no_bos_len:] == no_bos
    batch, lengths = client.encode(["Hello world", "a longer sentence than the first one"])
    assert batch[0] == input_ids and lengths == [len(b) for b in batch] and lengths[1] > lengths[0]
    templated, templated_len = client.encode("Hello world", do_preprocess=True)
    assert templated_len > length  # the chat template wraps the text in role markers


def test_chat_completions_v1_stream_equals_plain(client, model):
    messages = [{"role": "user", "content": "Name three fruits."}]
    (plain,) = client.chat_completions_v1(model, messages, temperature=0, max_tokens=24)
    assert plain["object"] == "chat.completion"
    text = plain["choices"][0]["message"]["content"]
    assert text and plain["usage"]["completion_tokens"] <= 24
    chunks = list(client.chat_completions_v1(model, messages, temperature=0, max_tokens=24, stream=True))
    assert len(chunks) > 2 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completions_v1_string_messages_logprobs_and_n(client, model):
    (out,) = client.chat_completions_v1(model, "Say hi", temperature=0.7, max_tokens=8, n=2, logprobs=True,
                                        top_logprobs=2)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    content = out["choices"][0]["logprobs"]["content"]
    assert content and len(content[0]["top_logprobs"]) == 2 and content[0]["logprob"] <= 0


def test_completions_v1_stream_equals_plain(client, model):
    (plain,) = client.completions_v1(model, "The capital of France is", temperature=0, max_tokens=12)
    assert plain["object"] == "text_completion"
    text = plain["choices"][0]["text"]
    chunks = list(client.completions_v1(model, "The capital of France is", temperature=0, max_tokens=12,
                                        stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    input_ids, _ = client.encode("The capital of France is")
    (by_ids,) = client.completions_v1(model, input_ids, temperature=0, max_tokens=12)
    assert by_ids["choices"][0]["text"] == text


def test_generate_prompt_and_input_ids(client):
    (out,) = client.generate(prompt="Once upon a time", max_tokens=10, temperature=0)
    assert out["text"] and len(out["output_ids"]) == out["meta_info"]["completion_tokens"] <= 10
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    input_ids, _ = client.encode("Once upon a time")
    (by_ids,) = client.generate(input_ids=input_ids, max_tokens=10, temperature=0)
    assert by_ids["output_ids"] == out["output_ids"]
    chunks = list(client.generate(prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c["text"] for c in chunks) == out["text"]
    with pytest.raises(ValueError):
        next(client.generate())


def test_chat_interactive_v1_keeps_and_ends_the_session(client):
    session_id = 424242
    try:
        (turn1,) = client.chat_interactive_v1(TURN_1, session_id=session_id, interactive_mode=True,
                                              request_output_len=16, temperature=0)
        assert turn1["text"] and turn1["history_tokens"] == 0 and turn1["input_tokens"] > 0
        chunks = list(client.chat_interactive_v1(TURN_2, session_id=session_id, interactive_mode=True,
                                                 stream=True, request_output_len=16, temperature=0))
        assert len(chunks) > 1
        # the second turn builds on the first: its history is turn 1's prompt and reply
        assert chunks[-1]["history_tokens"] >= turn1["input_tokens"] + turn1["tokens"]
        texts = list(client.chat(TURN_2, session_id=session_id, request_output_len=4, temperature=0))
        assert texts and all(isinstance(t, str) and isinstance(n, int) for t, n, _ in texts)
    finally:
        client.end_session(session_id)
    (fresh,) = client.chat_interactive_v1(TURN_2, session_id=session_id, interactive_mode=True,
                                          request_output_len=16, temperature=0)
    client.end_session(session_id)
    assert fresh["history_tokens"] == 0
    assert fresh["text"] != "".join(c["text"] for c in chunks)


def test_errors_raise_api_error(client):
    with pytest.raises(APIError) as info:
        next(client.chat_completions_v1("no-such-model", "hi"))
    assert info.value.status_code == 404
    with pytest.raises(APIError) as info:
        next(client.completions_v1(client.available_models[0], "hi", temperature=-1, stream=True))
    assert info.value.status_code == 400


def test_leaving_a_stream_early_aborts_it(client, model, api_server_url):
    def num_running() -> float:
        metrics = httpx.get(f"{api_server_url}/metrics").text
        (line,) = [line for line in metrics.splitlines() if line.startswith("lmserve:num_requests_running ")]
        return float(line.rsplit(" ", 1)[1])

    stream = client.completions_v1(model, "Count:", max_tokens=2000, ignore_eos=True, temperature=0, stream=True)
    next(stream)
    assert num_running() >= 1
    stream.close()  # closes the connection; the server must abort the request and free its blocks
    # NOTE: 2000 tokens take far longer than this deadline on a CPU; only an abort ends the request in time
    deadline = time.monotonic() + 5
    while num_running() > 0:
        if time.monotonic() > deadline:
            pytest.fail("the request kept running after the client left")
        time.sleep(0.1)


# ---- console chats ----------------------------------------------------------------------------------------
def _transcript_replies(stdout: str) -> list[str]:
    """Replies from a console transcript: the text after each `>>> prompt` line (commands have none)."""
    replies = []
    for block in stdout.split(PROMPT)[1:]:
        prompt, _, reply = block.partition("\n")
        if prompt.strip() not in ("exit", "reset"):
            replies.append(reply.strip())
    return replies


def _run_console(args: list[str], stdin: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lmserve", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_api_client_console_two_turns_share_a_session(api_server_url, client):
    args = ["serve", "api_client", api_server_url, "--temperature", "0", "--max-new-tokens", "16",
            "--session-id", "777"]
    out = _run_console(args, f"{TURN_1}\n{TURN_2}\nreset\n{TURN_2}\nexit\n")
    assert out.returncode == 0, out.stderr
    replies = _transcript_replies(out.stdout)
    assert len(replies) == 3 and all(replies), out.stdout
    assert "[session reset]" in out.stderr

    def session_replies(prompts: list[str]) -> list[str]:
        session_id = 778
        try:
            return ["".join(c["text"] for c in client.chat_interactive_v1(
                p, session_id=session_id, interactive_mode=True, stream=True, request_output_len=16,
                temperature=0)).strip() for p in prompts]
        finally:
            client.end_session(session_id)

    # the console's turns are exactly the server-side session an APIClient gets for the same prompts ...
    assert replies[:2] == session_replies([TURN_1, TURN_2])
    # ... and after reset the question is answered without the history, differently
    assert replies[2] == session_replies([TURN_2])[0]
    assert replies[2] != replies[1]
    # the console ended its session on exit: the id starts from an empty history again
    (reused,) = client.chat_interactive_v1("hi", session_id=777, interactive_mode=True, request_output_len=1)
    client.end_session(777)
    assert reused["history_tokens"] == 0


def test_api_client_console_reports_an_unreachable_server():
    out = _run_console(["serve", "api_client", f"http://127.0.0.1:{_free_port()}"], "hi\n", timeout=60)
    assert out.returncode == 1 and "cannot reach" in out.stderr


def test_local_chat_two_turns_keep_the_history(client, model):
    # --dtype float32: the exact mode, as the server fixture runs (auto would use int8 activations on quantized
    # weights, and greedy text could differ from the server's)
    args = ["chat", "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "16", "--cache-block-count", "256"]
    out = _run_console(args, f"{TURN_1}\n{TURN_2}\nreset\n{TURN_2}\nexit\n")
    assert out.returncode == 0, out.stderr
    replies = _transcript_replies(out.stdout)
    assert len(replies) == 3 and all(replies), out.stdout
    assert "[conversation reset]" in out.stderr
    # turn 2 is what the same model answers given the whole conversation (same template, greedy)
    history = [{"role": "user", "content": TURN_1}, {"role": "assistant", "content": replies[0]},
               {"role": "user", "content": TURN_2}]
    (with_history,) = client.chat_completions_v1(model, history, temperature=0, max_tokens=16)
    assert replies[1] == with_history["choices"][0]["message"]["content"].strip()
    # after reset the same question is answered with no history, and the answer differs
    (alone,) = client.chat_completions_v1(model, [{"role": "user", "content": TURN_2}], temperature=0,
                                          max_tokens=16)
    assert replies[2] == alone["choices"][0]["message"]["content"].strip()
    assert replies[1] != replies[2]


@pytest.fixture(scope="module")
def keyed_server_url(tmp_path_factory, tiny_models):
    """An api_server that wants an API key, on a tiny random model (fast to load; its text is noise)."""
    from conftest import start_api_server
    server = start_api_server(tmp_path_factory.mktemp("keyed_server"), tiny_models["llama"], "--api-keys",
                              "secret-key", "--cache-block-count", "64", health_headers=_bearer("secret-key"))
    yield server.url
    server.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_is_sent(keyed_server_url):
    with APIClient(keyed_server_url) as anonymous, pytest.raises(APIError) as info:
        anonymous.available_models
    assert info.value.status_code == 401
    with pytest.raises(APIError):
        get_model_list(keyed_server_url, api_key="wrong-key")
    with APIClient(keyed_server_url, api_key="secret-key") as keyed:
        model = keyed.available_models[0]
        assert get_model_list(keyed_server_url, api_key="secret-key") == [model]
        (out,) = keyed.chat_completions_v1(model, "hi", max_tokens=3, temperature=0)
        assert out["usage"]["completion_tokens"] == 3
        assert keyed.encode("hi")[1] > 0
    args = ["serve", "api_client", keyed_server_url, "--max-new-tokens", "3"]
    refused = _run_console(args, "hi\n", timeout=120)
    assert refused.returncode == 1 and "401" in refused.stderr
    answered = _run_console([*args, "--api-key", "secret-key"], "hi\nexit\n", timeout=120)
    assert answered.returncode == 0, answered.stderr
    assert len(_transcript_replies(answered.stdout)) == 1


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_api_client_console_in_a_terminal(api_server_url):
    """In a tty the console shows the `>>> ` prompt, reads typed lines, streams the reply and quits on exit."""
    session = f"lmserve-test-{os.getpid()}"
    command = (f"{shlex.quote(sys.executable)} -m lmserve serve api_client {api_server_url} --temperature 0 "
               f"--max-new-tokens 8; echo EXITED=$?; sleep 60")

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                              text=True).stdout

    def wait_for(predicate, timeout=120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = screen()
            if predicate(text):
                return text
            time.sleep(0.3)
        pytest.fail(f"terminal never showed what was expected:\n{screen()}")

    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command], check=True)
    try:
        wait_for(lambda text: text.rstrip().endswith(PROMPT.rstrip()))
        subprocess.run(["tmux", "send-keys", "-t", session, "Say hello.", "Enter"], check=True)
        # the reply, then a fresh prompt
        text = wait_for(lambda text: text.count(PROMPT.rstrip()) >= 2 and text.rstrip().endswith(PROMPT.rstrip()))
        reply = text.split(f"{PROMPT}Say hello.", 1)[1].rsplit(PROMPT.rstrip(), 1)[0].strip()
        assert reply
        subprocess.run(["tmux", "send-keys", "-t", session, "exit", "Enter"], check=True)
        wait_for(lambda text: "EXITED=0" in text)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
