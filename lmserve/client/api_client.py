"""APIClient: a synchronous client for an lmserve (or LMDeploy) api_server, with LMDeploy's method names.

    from lmserve.client import APIClient
    client = APIClient("http://127.0.0.1:23333")
    model = client.available_models[0]
    for item in client.chat_completions_v1(model=model, messages=[{"role": "user", "content": "hi"}]):
        print(item)

Every generation method is a generator of response dicts: one dict when `stream=False`, one per chunk when
`stream=True`. Streams are parsed line by line, so both SSE (`data: {...}` ... `data: [DONE]`) and
newline-delimited JSON work. Leaving a stream early (break, close, garbage collection) closes the connection,
and the server aborts the request. HTTP errors raise `APIError` (LMDeploy's client would yield the error body
as if it were a response; raising makes a failed request impossible to mistake for an answer).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

# NOTE: no read timeout: a long generation on a CPU can legitimately take minutes between bytes (prefill).
DEFAULT_TIMEOUT = httpx.Timeout(None, connect=10.0)


class APIError(RuntimeError):
    """A non-2xx answer. `body` is the decoded JSON (the OpenAI error shape) or the raw text."""

    def __init__(self, status_code: int, body: Any):
        self.status_code = status_code
        self.body = body
        message = body
        if isinstance(body, dict):
            err = body.get("error", body)
            message = err.get("message", body) if isinstance(err, dict) else err
        super().__init__(f"HTTP {status_code}: {message}")


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")


def get_model_list(api_url: str, api_key: str | None = None) -> list[str]:
    """Model ids served at `api_url`: a base URL (http://host:port) or the /v1/models URL itself."""
    url = _base_url(api_url)
    if not url.endswith("/v1/models"):
        url += "/v1/models"
    response = httpx.get(url, headers=_headers(api_key), timeout=DEFAULT_TIMEOUT)
    if response.status_code >= 400:
        raise APIError(response.status_code, _decode(response.content))
    return [card["id"] for card in response.json().get("data", [])]


def iter_stream_lines(lines: Iterator[str]) -> Iterator[dict]:
    """JSON objects from a streamed body: SSE `data:` lines (ending at `[DONE]`) or newline-delimited JSON."""
    for line in lines:
        # NOTE: LMDeploy's first /generate streamed NUL-delimited JSON; accept that too.
        for part in line.split("\0"):
            part = part.strip()
            if not part or part.startswith(":") or part.startswith(("event:", "id:", "retry:")):
                continue  # SSE comments (keep-alives) and non-data fields
            if part.startswith("data:"):
                part = part[5:].strip()
            if part == "[DONE]":
                return
            yield json.loads(part)


class APIClient:
    """A client for one api_server.

    Args:
        api_server_url: 'http://<ip>:<port>' of the api_server.
        api_key: sent as `Authorization: Bearer <api_key>`; None sends no key.
        timeout: an httpx timeout; the default waits as long as generation takes.
    """

    def __init__(self, api_server_url: str, api_key: str | None = None,
                 timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT, **kwargs):
        self.api_server_url = _base_url(api_server_url)
        self.api_key = api_key
        self.chat_interactive_v1_url = f"{self.api_server_url}/v1/chat/interactive"
        self.chat_completions_v1_url = f"{self.api_server_url}/v1/chat/completions"
        self.completions_v1_url = f"{self.api_server_url}/v1/completions"
        self.generate_url = f"{self.api_server_url}/generate"
        self.models_v1_url = f"{self.api_server_url}/v1/models"
        self.encode_v1_url = f"{self.api_server_url}/v1/encode"
        self.headers = _headers(api_key)
        self._http = httpx.Client(headers=self.headers, timeout=timeout)
        self._available_models: list[str] | None = None

    # ---- plumbing -------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> APIClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, url: str, payload: dict) -> Any:
        response = self._http.post(url, json=payload)
        body = _decode(response.content)
        if response.status_code >= 400:
            raise APIError(response.status_code, body)
        return body

    def _get_json(self, url: str) -> Any:
        response = self._http.get(url)
        body = _decode(response.content)
        if response.status_code >= 400:
            raise APIError(response.status_code, body)
        return body

    def _post_and_iterate(self, url: str, payload: dict, stream: bool) -> Iterator[dict]:
        """One dict for a plain answer; one per chunk for a stream."""
        if not stream:
            yield self._post(url, payload)
            return
        with self._http.stream("POST", url, json=payload) as response:
            if response.status_code >= 400:
                raise APIError(response.status_code, _decode(response.read()))
            yield from iter_stream_lines(response.iter_lines())

    @staticmethod
    def _payload(fields: dict, kwargs: dict) -> dict:
        """Request body: the named arguments that are set (None lets the server's default apply) plus kwargs."""
        payload = {k: v for k, v in fields.items() if v is not None}
        payload.update(kwargs)
        return payload

    # ---- endpoints -------------------------------------------------------------------------------------
    @property
    def available_models(self) -> list[str]:
        """Model ids from /v1/models (fetched once)."""
        if self._available_models is None:
            self._available_models = [card["id"] for card in self._get_json(self.models_v1_url)["data"]]
        return self._available_models

    def encode(self, input: str | list[str], do_preprocess: bool = False,
               add_bos: bool = True) -> tuple[list[int] | list[list[int]], int | list[int]]:
        """Token ids of `input` (a string or a list of strings) -> (input_ids, length).

        do_preprocess: render `input` as a user turn through the chat template first.
        add_bos: prepend BOS (True at the start of a conversation).
        """
        output = self._post(self.encode_v1_url, dict(input=input, do_preprocess=do_preprocess, add_bos=add_bos))
        return output["input_ids"], output["length"]

    def chat_completions_v1(self, model: str, messages: str | list[dict[str, Any]],
                            temperature: float = 0.7, top_p: float = 1.0, logprobs: bool = False,
                            top_logprobs: int = 0, n: int = 1, max_tokens: int | None = None,
                            stop: str | list[str] | None = None, stream: bool = False,
                            presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                            user: str | None = None, repetition_penalty: float = 1.0, session_id: int = -1,
                            ignore_eos: bool = False, skip_special_tokens: bool = True,
                            **kwargs) -> Iterator[dict]:
        """POST /v1/chat/completions. `messages` is a string (one user turn) or OpenAI-format messages.

        Extra OpenAI/LMDeploy fields (top_k, seed, min_p, stream_options, response_format, ...) go in kwargs.
        Yields the completion (stream=False) or each `chat.completion.chunk` (stream=True).
        """
        payload = self._payload(dict(
            model=model, messages=messages, temperature=temperature, top_p=top_p, n=n, max_tokens=max_tokens,
            stop=stop, stream=stream, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            user=user, repetition_penalty=repetition_penalty, session_id=session_id, ignore_eos=ignore_eos,
            skip_special_tokens=skip_special_tokens), kwargs)
        if logprobs:
            # NOTE: OpenAI rejects top_logprobs without logprobs, so only send it with logprobs on.
            payload.update(logprobs=True, top_logprobs=top_logprobs)
        yield from self._post_and_iterate(self.chat_completions_v1_url, payload, stream)

    def completions_v1(self, model: str, prompt: str | list[Any], suffix: str | None = None,
                       temperature: float = 0.7, n: int = 1, max_tokens: int | None = 16,
                       stream: bool = False, stop: str | list[str] | None = None, top_p: float = 1.0,
                       top_k: int = 40, user: str | None = None, repetition_penalty: float = 1.0,
                       session_id: int = -1, ignore_eos: bool = False, skip_special_tokens: bool = True,
                       logprobs: int | None = None, echo: bool = False, **kwargs) -> Iterator[dict]:
        """POST /v1/completions. `prompt`: a string, a list of strings, token ids or a list of token-id lists.

        Yields the completion (stream=False) or each `text_completion` chunk (stream=True).
        """
        payload = self._payload(dict(
            model=model, prompt=prompt, suffix=suffix, temperature=temperature, n=n, max_tokens=max_tokens,
            stream=stream, stop=stop, top_p=top_p, top_k=top_k, user=user, repetition_penalty=repetition_penalty,
            session_id=session_id, ignore_eos=ignore_eos, skip_special_tokens=skip_special_tokens,
            logprobs=logprobs, echo=echo or None), kwargs)
        yield from self._post_and_iterate(self.completions_v1_url, payload, stream)

    def generate(self, prompt: str | None = None, input_ids: list[int] | None = None, max_tokens: int = 128,
                 stream: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, ignore_eos: bool = False,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
                 stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                 include_stop_str_in_output: bool = False, return_logprob: bool | None = None,
                 session_id: int = -1, **kwargs) -> Iterator[dict]:
        """POST /generate (LMDeploy-native): a raw `prompt` (no chat template) or `input_ids`.

        Yields `{text, output_ids, meta_info: {prompt_tokens, completion_tokens, finish_reason, ...}}` once, or
        one such dict per chunk when streaming.
        """
        if (prompt is None) == (input_ids is None):
            raise ValueError("generate: give exactly one of prompt and input_ids")
        payload = self._payload(dict(
            prompt=prompt, input_ids=input_ids, max_tokens=max_tokens, stream=stream, temperature=temperature,
            top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
            skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=spaces_between_special_tokens,
            stop=stop, stop_token_ids=stop_token_ids, include_stop_str_in_output=include_stop_str_in_output,
            return_logprob=return_logprob, session_id=session_id), kwargs)
        yield from self._post_and_iterate(self.generate_url, payload, stream)

    def chat_interactive_v1(self, prompt: str | list[dict[str, Any]], session_id: int = 0,
                            interactive_mode: bool = False, stream: bool = False,
                            stop: str | list[str] | None = None, request_output_len: int | None = None,
                            top_p: float = 0.8, top_k: int = 40, temperature: float = 0.8,
                            repetition_penalty: float = 1.0, ignore_eos: bool = False,
                            skip_special_tokens: bool = True, adapter_name: str | None = None,
                            **kwargs) -> Iterator[dict]:
        """POST /v1/chat/interactive.

        With `interactive_mode=True` the server keeps the session's history (and its KV cache), so each turn
        sends only the new prompt. With `interactive_mode=False` the request is one-shot and ends the session.
        Yields `{text, tokens, input_tokens, history_tokens, finish_reason}`: once, or per chunk (delta text)
        when streaming.
        """
        payload = self._payload(dict(
            prompt=prompt, session_id=session_id, interactive_mode=interactive_mode, stream=stream, stop=stop,
            request_output_len=request_output_len, top_p=top_p, top_k=top_k, temperature=temperature,
            repetition_penalty=repetition_penalty, ignore_eos=ignore_eos, skip_special_tokens=skip_special_tokens,
            adapter_name=adapter_name), kwargs)
        yield from self._post_and_iterate(self.chat_interactive_v1_url, payload, stream)

    # ---- conveniences over the interactive endpoint (as in LMDeploy's client) --------------------------
    def chat(self, prompt: str, session_id: int, request_output_len: int | None = 512, stream: bool = False,
             top_p: float = 0.8, top_k: int = 40, temperature: float = 0.8, repetition_penalty: float = 1.0,
             ignore_eos: bool = False, **kwargs) -> Iterator[tuple[str, int, str | None]]:
        """One turn of a server-side session: yields (text, tokens, finish_reason)."""
        if session_id == -1:
            raise ValueError("chat: session_id must be set (not -1) to keep a session")
        for output in self.chat_interactive_v1(
                prompt, session_id=session_id, interactive_mode=True, stream=stream,
                request_output_len=request_output_len, top_p=top_p, top_k=top_k, temperature=temperature,
                repetition_penalty=repetition_penalty, ignore_eos=ignore_eos, **kwargs):
            yield output.get("text", ""), output.get("tokens", 0), output.get("finish_reason")

    def end_session(self, session_id: int) -> None:
        """Forget a session's history on the server (an empty, non-interactive, zero-length request)."""
        for _ in self.chat_interactive_v1(prompt="", session_id=session_id, request_output_len=0,
                                          interactive_mode=False):
            pass
