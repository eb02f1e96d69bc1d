"""Interactive sessions: the server keeps each session's token history; the engine keeps its KV blocks pinned.

A turn's prompt is the session's history tokens (the previous turn's prompt + output, exactly the tokens whose
KV the engine kept) followed by the new tokens, so only the new tokens are prefilled: the time to first token of
turn N does not grow with the history. Re-tokenizing the rendered conversation instead could split the previous
output differently and miss the cache from that point on.

A session ends with POST /chat/reset {"session_id": N}, `interactive_mode: false` on /v1/chat/interactive,
`sequence_end: true` on /generate, or when it is the least recently used one and pinned sessions hold more
than half of the KV cache.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collections.abc import AsyncIterator

from lmserve.outputs import CompletionOutput, FinishReason, RequestOutput
from lmserve.server.errors import APIError

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

MAX_PINNED_FRACTION = 0.5   # of the KV cache's tokens; beyond it idle sessions are ended, least recent first


@dataclass
class Session:
    session_id: int
    token_ids: list[int] = field(default_factory=list)   # prompt + output of the last finished turn
    messages: list[dict[str, Any]] = field(default_factory=list)   # /v1/chat/interactive's conversation
    prompt_text: str | None = None     # the last turn's rendered chat prompt (None: raw-token session)
    output_text: str = ""              # the last turn's output text
    eos_text: str = ""                 # the EOS the last turn ended on, as the chat template spells it
    exact_output: bool = False         # output_text decodes exactly from the output tokens
    request_id: str | None = None      # the turn in flight
    last_used: float = field(default_factory=time.monotonic)

    @property
    def num_history_tokens(self) -> int:
        return len(self.token_ids)


class SessionManager:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._sessions: dict[int, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def begin(self, session_id: int, request_id: str) -> Session:
        """Claim the session for one turn; one turn at a time per session."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = Session(session_id)
        if session.request_id is not None:
            raise APIError(400, f"session {session_id} is busy with request {session.request_id}; wait for it, "
                                f"or POST /abort_request {{\"session_id\": {session_id}}}",
                           param="session_id", code="session_busy")
        session.request_id = request_id
        session.last_used = time.monotonic()
        return session

    def release(self, session: Session) -> None:
        """The turn ended without a usable output (error or abort): keep the previous history."""
        session.request_id = None

    def release_request(self, request_id: str) -> None:
        """Called when an HTTP request ends: a session its turn still holds is freed (nothing is kept)."""
        for session in self._sessions.values():
            if session.request_id == request_id:
                session.request_id = None

    async def track(self, session: Session, stream: AsyncIterator[RequestOutput], prompt_token_ids: list[int],
                    prompt_text: str | None = None,
                    messages: list[dict[str, Any]] | None = None,
                    end_after: bool = False) -> AsyncIterator[RequestOutput]:
        """Pass a turn's outputs through; when it finishes, its prompt + output become the session history
        (or, with `end_after`, the session ends)."""
        last = None
        try:
            async for out in stream:
                last = out
                yield out
        finally:
            first = last.outputs[0] if last is not None and last.finished and last.outputs else None
            if end_after:
                self.release(session)
                await self.end(session.session_id)
            elif self._sessions.get(session.session_id) is not session:
                # ended (POST /chat/reset) while this turn ran: unpin what the engine kept for it
                session.request_id = None
                if session.session_id not in self._sessions:
                    await asyncio.to_thread(self.engine.end_session, session.session_id)
            elif first is not None and first.finish_reason != FinishReason.ABORT:
                await self.finish_turn(session, prompt_token_ids, first, prompt_text, messages)
            else:
                self.release(session)

    async def finish_turn(self, session: Session, prompt_token_ids: list[int], output: CompletionOutput,
                    prompt_text: str | None = None, messages: list[dict[str, Any]] | None = None) -> None:
        session.request_id = None
        session.token_ids = list(prompt_token_ids) + list(output.token_ids)
        session.prompt_text = prompt_text
        session.output_text = output.text
        last = output.token_ids[-1] if output.token_ids else None
        eos = last is not None and last in self.tokenizer.eos_token_ids
        session.eos_text = self.tokenizer.decode([last], skip_special_tokens=False) if eos else ""
        session.exact_output = self.tokenizer.decode(output.token_ids, skip_special_tokens=True) == output.text
        if messages is not None:
            session.messages = messages + [{"role": "assistant", "content": output.text}]
        session.last_used = time.monotonic()
        await self._evict_idle()

    def continue_chat(self, session: Session | None, full_text: str) -> list[int] | None:
        """Prompt tokens for a rendered conversation that continues the session's last turn: its history
        tokens + the tokens of the new tail. None when the conversation does not continue it."""
        if session is None or not session.token_ids or session.prompt_text is None or not session.exact_output:
            return None
        prefix = session.prompt_text + session.output_text
        if not full_text.startswith(prefix):
            return None
        tail = full_text[len(prefix):]
        if session.eos_text and tail.startswith(session.eos_text):
            tail = tail[len(session.eos_text):]    # the EOS token is already in the history
        return session.token_ids + self.tokenizer.encode(tail, add_special_tokens=False)

    async def end(self, session_id: int) -> bool:
        session = self._sessions.pop(session_id, None)
        # NOTE: end_session waits for the engine thread (between steps): off the event loop
        ended = bool(await asyncio.to_thread(self.engine.end_session, session_id))
        return session is not None or ended

    async def end_all(self) -> int:
        ids = list(self._sessions)
        for sid in ids:
            await self.end(sid)
        return len(ids)

    async def _evict_idle(self) -> None:
        try:
            stats = self.engine.get_stats()
            capacity = stats.num_total_blocks * self.engine.config.cache.block_size
        except Exception:    # an engine without stats: no eviction
            return
        pinned = sum(s.num_history_tokens for s in self._sessions.values())
        if pinned <= MAX_PINNED_FRACTION * capacity:
            return
        for session in sorted(self._sessions.values(), key=lambda s: s.last_used):
            if pinned <= MAX_PINNED_FRACTION * capacity:
                break
            if session.request_id is None:
                logger.info("ending idle session %d to free %d pinned tokens", session.session_id,
                            session.num_history_tokens)
                pinned -= session.num_history_tokens
                await self.end(session.session_id)
