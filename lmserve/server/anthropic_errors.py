"""Errors on the Anthropic paths (/v1/messages...) leave in Anthropic's shape,
`{"type": "error", "error": {"type": ..., "message": ...}}`, whoever made them (a handler, request validation, the
API-key check, admission control, or the proxy). A pure-ASGI wrapper rewrites JSON error bodies on those paths
only, so every other path keeps OpenAI's shape and no error handler needs to know which API it serves."""
from __future__ import annotations

import json

from lmserve.server.protocol.anthropic import error_body

ANTHROPIC_PREFIX = "/v1/messages"


def reshape(body: bytes, status: int) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or data.get("type") == "error":
        return body
    err = data.get("error")
    message = err.get("message") if isinstance(err, dict) else data.get("detail") or str(err or data)
    return json.dumps(error_body(status, str(message))).encode()


class AnthropicErrors:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(ANTHROPIC_PREFIX):
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def wrapped(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", ()))
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    start = message        # held back until the body is whole
                    return
                return await send(message)
            if start is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = reshape(b"".join(chunks), start["status"])
                headers = [(k, v) for k, v in start.get("headers", ()) if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send(dict(start, headers=headers))
                return await send({"type": "http.response.body", "body": body})
            return await send(message)

        await self.app(scope, receive, wrapped)
