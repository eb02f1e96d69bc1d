"""The built-in web page: a chat playground and a live dashboard, plain HTML/CSS/JS modules in this folder.

`mount_web(app)` serves `index.html` at `/` and the rest under `/web/`. The api_server and the proxy both mount
it; the page finds out which one it talks to from `/health` (the proxy's answer counts nodes). Nothing is
fetched from the internet: marked (Markdown) and DOMPurify (HTML sanitizer) are vendored under `vendor/`.
The page is open without an API key; the API it calls is not (the page sends the key the user types).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).parent
WEB_PREFIX = "/web"


def is_web_path(path: str) -> bool:
    """Paths of the page itself: reachable without an API key."""
    return path == "/" or path.startswith(WEB_PREFIX + "/")


def mount_web(app: FastAPI) -> None:
    index = WEB_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def web_index():
        # NOTE: no-cache, so a browser picks up a new page after an upgrade (it still revalidates with ETag).
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount(WEB_PREFIX, StaticFiles(directory=WEB_DIR, html=False), name="web")
