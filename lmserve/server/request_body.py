"""Reading a request body whole in pure ASGI, bounded by --max-request-body-bytes, and handing it on to the app
unchanged. Shared by the server's middleware (server/middleware.py, which adds --body-read-timeout) and the
proxy's BodyLimit (proxy/body_limit.py), so it stays free of torch and of the engine."""
from __future__ import annotations

from lmserve.server.errors import error_response


class BodyTooLarge(Exception):
    pass


async def read_body(scope, receive, limit: int) -> bytes | None:
    """The whole body, or None when the client left while sending it. Raises BodyTooLarge as soon as the
    Content-Length or the bytes received pass `limit`, before the rest is read."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def too_large(limit: int):
    return error_response(413, f"the request body is larger than {limit} bytes (--max-request-body-bytes)",
                          code="request_too_large", headers={"Connection": "close"})


def replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then the client's later messages (disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed
