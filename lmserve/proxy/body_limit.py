"""The proxy's bound on request bodies (--max-request-body-bytes): larger bodies get 413 before any node is
picked. Image requests carry base64 data: URIs (4 bytes per 3 of image), so the default fits a few large images;
the proxy forwards bodies as they came, so it should be no smaller than its nodes' own --max-request-body-bytes."""
from __future__ import annotations

from starlette.responses import JSONResponse

from lmserve.server.errors import error_body


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(error_body(413, f"the request body is larger than {limit} bytes (--max-request-body-bytes)",
                                   code="request_too_large"), status_code=413, headers={"Connection": "close"})


class BodyLimit:
    """Pure ASGI: reads a request body up to `limit` bytes (then hands it on unchanged), else answers 413."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await _too_large(self.limit)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _too_large(self.limit)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)
