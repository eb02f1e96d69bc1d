"""The proxy's bound on request bodies (--max-request-body-bytes): larger bodies get 413 before any node is
picked. Image requests carry base64 data: URIs (4 bytes per 3 of image), so the default fits a few large images;
the proxy forwards bodies as they came, so it should be no smaller than its nodes' own --max-request-body-bytes.
The reading and replaying is the server's (server/request_body.py, torch-free)."""
from __future__ import annotations

from lmserve.server.request_body import BodyTooLarge, read_body, replay, too_large


class BodyLimit:
    """Pure ASGI: reads a request body up to `limit` bytes (then hands it on unchanged), else answers 413."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        try:
            body = await read_body(scope, receive, self.limit)
        except BodyTooLarge:
            return await too_large(self.limit)(scope, receive, send)
        if body is None:            # the client left while sending it
            return None
        return await self.app(scope, replay(body, receive), send)
