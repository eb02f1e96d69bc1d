"""Console chats: `lmserve serve api_client URL` (against a running server) and `lmserve chat [MODEL]` (in-process).

Both read one prompt per line from stdin, so they work in a terminal and with piped input alike, and stream the
reply as it is generated. Commands: `exit` (or end of input) quits, `reset` forgets the conversation.

stdout is the transcript: `>>> prompt` lines (echoed when stdin is not a terminal) followed by the reply.
Banners, warnings and errors go to stderr. Ctrl-C while a reply streams stops that reply; at the prompt it quits.
"""
from __future__ import annotations

import asyncio
import dataclasses
import queue
import random
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from lmserve.client.api_client import APIClient, APIError

if TYPE_CHECKING:
    import argparse

    from lmserve.config import EngineConfig
    from lmserve.outputs import RequestOutput
    from lmserve.sampling_params import SamplingParams

PROMPT = ">>> "
EXIT_COMMANDS = ("exit", "quit")
RESET_COMMAND = "reset"
LOCAL_SESSION_ID = 0
# under the model's generation defaults (--generation-config); the console's defaults before those existed
CONSOLE_SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9}
SESSION_FULL_HINT = "[the conversation reached the session length; type 'reset' to start a new one]"


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_prompts() -> Iterator[str]:
    """Non-empty prompts from stdin, one per line, until end of input."""
    is_tty = sys.stdin.isatty()
    if is_tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        if is_tty:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        prompt = line.strip()
        if not prompt:
            continue
        if not is_tty:
            print(PROMPT + prompt, flush=True)
        yield prompt


def _stream_reply(deltas: Iterator[str]) -> str:
    """Print text deltas as they arrive; Ctrl-C stops the reply (closing the iterator aborts the request)."""
    parts: list[str] = []
    try:
        for delta in deltas:
            parts.append(delta)
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
        print(flush=True)
        _info("[interrupted]")
        return "".join(parts)
    print(flush=True)
    return "".join(parts)


# ---- lmserve serve api_client URL ---------------------------------------------------------------------------
def run_api_client(api_server_url: str, api_key: str | None = None, session_id: int | None = None,
                   temperature: float = 0.8, top_p: float = 0.8, top_k: int = 40,
                   max_new_tokens: int | None = 512) -> int:
    """Chat with a running api_server through a server-side session (/v1/chat/interactive).

    The server keeps the history and its KV cache, so each turn sends only the new prompt. `reset` ends the
    session (the server forgets it) and the next prompt starts a new one under the same id.
    """
    client = APIClient(api_server_url, api_key=api_key)
    if session_id is None:
        # NOTE: a random id, so two consoles on one server do not share (and garble) one session.
        session_id = random.randrange(1, 2**31)
    try:
        models = client.available_models
    except httpx.HTTPError as e:
        _info(f"error: cannot reach the api_server at {client.api_server_url}: {e}")
        return 1
    except APIError as e:  # e.g. 401: a missing or wrong --api-key
        _info(f"error: the api_server at {client.api_server_url} refused: {e}")
        return 1
    _info(f"connected to {client.api_server_url} (model: {', '.join(models)}; session {session_id}); "
          f"type 'reset' to start over, 'exit' to quit")

    def deltas(prompt: str) -> Iterator[str]:
        for output in client.chat_interactive_v1(
                prompt, session_id=session_id, interactive_mode=True, stream=True,
                request_output_len=max_new_tokens, top_p=top_p, top_k=top_k, temperature=temperature):
            if output.get("text"):
                yield output["text"]
            # NOTE: `tokens` counts this turn's generated tokens; stopping short of the limit on "length"
            # means the session, not the turn, ran out of room.
            if output.get("finish_reason") == "length" and (
                    max_new_tokens is None or output.get("tokens", 0) < max_new_tokens):
                _info(SESSION_FULL_HINT)

    try:
        for prompt in _prompts_or_interrupt():
            if prompt in EXIT_COMMANDS:
                break
            if prompt == RESET_COMMAND:
                client.end_session(session_id)
                _info("[session reset]")
                continue
            try:
                _stream_reply(deltas(prompt))
            except APIError as e:
                _info(f"error: {e}")
            except httpx.HTTPError as e:
                _info(f"error: lost the api_server: {e}")
                return 1
    finally:
        try:
            client.end_session(session_id)
        except (httpx.HTTPError, APIError):
            pass  # the server is gone, and the session with it
        client.close()
    return 0


def _prompts_or_interrupt() -> Iterator[str]:
    """read_prompts(), where Ctrl-C at the prompt quits quietly."""
    prompts = read_prompts()
    while True:
        try:
            yield next(prompts)
        except StopIteration:
            return
        except KeyboardInterrupt:
            print(flush=True)
            return


# ---- lmserve chat [MODEL] -----------------------------------------------------------------------------------
class _BackgroundEngine:
    """An AsyncEngine on an event loop in a daemon thread, so the console loop can block on stdin and Ctrl-C."""

    def __init__(self, engine_config: EngineConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lmserve-chat-engine", daemon=True)
        self._thread.start()
        self.engine = self._call(self._start(engine_config))

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @staticmethod
    async def _start(engine_config: EngineConfig):
        from lmserve.engine.async_engine import AsyncEngine
        engine = AsyncEngine.from_config(engine_config)
        await engine.start()
        return engine

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 session_id: int | None = None) -> Iterator[RequestOutput]:
        """The engine's cumulative outputs for one request; closing the iterator early aborts the request."""
        request_id = f"chat-{uuid.uuid4().hex}"
        outputs: queue.Queue = queue.Queue()
        done = object()

        async def pump():
            try:
                async for output in self.engine.generate(request_id, prompt_token_ids, params,
                                                         session_id=session_id):
                    outputs.put(output)
            except BaseException as e:  # noqa: BLE001 - handed to the console thread, which re-raises
                outputs.put(e)
            finally:
                outputs.put(done)

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while (item := outputs.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not future.done():
                self._call(self.engine.abort(request_id))
                future.cancel()

    def end_session(self, session_id: int) -> None:
        self.engine.end_session(session_id)

    def shutdown(self) -> None:
        self._call(self.engine.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def _text_deltas(outputs: Iterator[RequestOutput], on_finish: Callable[[RequestOutput], None]) -> Iterator[str]:
    """Cumulative outputs -> new text since the previous one."""
    num_chars = 0
    last = None
    try:
        for last in outputs:
            text = last.outputs[0].text
            if len(text) > num_chars:
                yield text[num_chars:]
                num_chars = len(text)
    finally:
        close = getattr(outputs, "close", None)
        if close is not None:
            close()
    if last is not None:
        on_finish(last)


def run_local_chat(engine_config: EngineConfig, args: argparse.Namespace) -> int:
    """Chat with an in-process engine. The console keeps the messages and renders the whole conversation
    through the chat template each turn; an engine session keeps the previous turns' KV blocks pinned, so
    the prefix cache serves them instead of recomputing the history."""
    from lmserve.outputs import FinishReason
    from lmserve.sampling_params import SamplingParams

    _info("loading the model ...")
    engine = _BackgroundEngine(engine_config)
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len
    system = [{"role": "system", "content": args.system}] if getattr(args, "system", None) else []
    messages: list[dict[str, str]] = list(system)
    # the console's own defaults, the model's generation defaults (--generation-config) over them, then the flags
    given = {"temperature": args.temperature, "top_p": args.top_p}
    sampling = {**CONSOLE_SAMPLING_DEFAULTS, **engine.engine.generation_defaults,
                **{k: v for k, v in given.items() if v is not None}}
    params = SamplingParams(max_tokens=args.max_new_tokens, **sampling)
    _info(f"model: {engine.engine.model_path} (session length {max_model_len}); "
          f"sampling {', '.join(f'{k}={v}' for k, v in sampling.items())}; type 'reset' to start over, 'exit' to quit")

    def on_finish(output: RequestOutput) -> None:
        completion = output.outputs[0]
        if completion.finish_reason == FinishReason.LENGTH and len(completion.token_ids) < params.max_tokens:
            _info(SESSION_FULL_HINT)

    try:
        for prompt in _prompts_or_interrupt():
            if prompt in EXIT_COMMANDS:
                break
            if prompt == RESET_COMMAND:
                messages = list(system)
                engine.end_session(LOCAL_SESSION_ID)
                _info("[conversation reset]")
                continue
            messages.append({"role": "user", "content": prompt})
            prompt_token_ids = tokenizer.encode_chat(messages)
            room = max_model_len - len(prompt_token_ids)
            if room < 1:
                messages.pop()
                _info(SESSION_FULL_HINT)
                continue
            # NOTE: near the session length the reply gets what room is left rather than an error.
            turn_params = dataclasses.replace(params, max_tokens=min(params.max_tokens, room))
            outputs = engine.generate(prompt_token_ids, turn_params, session_id=LOCAL_SESSION_ID)
            try:
                reply = _stream_reply(_text_deltas(outputs, on_finish))
            except ValueError as e:  # a request the engine refuses (e.g. a bad sampling setting)
                messages.pop()
                _info(f"error: {e}")
                continue
            messages.append({"role": "assistant", "content": reply})
    finally:
        engine.shutdown()
    return 0
