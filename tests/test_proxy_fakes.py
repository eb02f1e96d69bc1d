"""Test doubles for the proxy tests: a tiny fake api_server (FastAPI) and a uvicorn-in-a-thread runner.

The fake node's behaviour is switched at run time through `app.state.behavior`, so one test can make a node slow,
fail with a status, die before its first chunk or die mid-stream. No test functions here.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, StreamingResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """A port p with p .. p + n - 1 all free now (`launch --base-port` takes consecutive ports; a free first port
    alone once collided with another process on the second)."""
    while True:
        base = free_port()
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


ROUTED = ("/v1/chat/completions", "/v1/completions", "/generate", "/v1/embeddings", "/v1/encode", "/pooling",
          "/v1/chat/interactive")


def fake_node_app(name: str, model: str = "fake-model") -> FastAPI:
    app = FastAPI()
    app.state.behavior = {"health_status": 200, "fail_status": None, "die_before_first_chunk": False,
                          "die_after_chunks": None, "num_chunks": 4, "chunk_delay": 0.0, "first_delay": 0.0,
                          "busy_health_delay": 0.0}
    app.state.requests = []        # (path, body, headers) of every routed request
    app.state.num_active = 0       # streams in progress
    app.state.num_inflight = 0     # requests being handled (before their response starts)
    app.state.num_cancelled = 0    # streams the client (the proxy) went away from
    app.state.terminated = False

    @app.get("/health")
    async def health():
        if app.state.num_inflight and app.state.behavior["busy_health_delay"]:
            await asyncio.sleep(app.state.behavior["busy_health_delay"])    # too busy to answer in time
        return JSONResponse({}, status_code=app.state.behavior["health_status"])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake"}]}

    @app.get("/terminate")
    async def terminate():
        app.state.terminated = True
        return {}

    async def handle(request: Request):
        b = app.state.behavior
        body = await request.json()
        app.state.requests.append((request.url.path, body, dict(request.headers)))
        if b["fail_status"]:
            return JSONResponse({"error": {"message": "busy", "type": "x", "param": None, "code": None}},
                                status_code=b["fail_status"])
        if b["first_delay"]:
            app.state.num_inflight += 1
            try:
                await asyncio.sleep(b["first_delay"])
            finally:
                app.state.num_inflight -= 1
        if not body.get("stream"):
            if b["die_before_first_chunk"]:
                raise RuntimeError("fake node crash")
            return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": model, "node": name,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": f"hello from {name}"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        async def events():
            app.state.num_active += 1
            try:
                if b["die_before_first_chunk"]:
                    raise RuntimeError("fake node crash before the first chunk")
                for i in range(b["num_chunks"]):
                    if b["die_after_chunks"] is not None and i == b["die_after_chunks"]:
                        raise RuntimeError("fake node crash mid-stream")
                    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                             "node": name, "t": time.time(),
                             "choices": [{"index": 0, "delta": {"content": f"{name}{i} "}, "finish_reason": None}]}
                    yield f"{json.dumps(chunk)}\n" if ndjson else f"data: {json.dumps(chunk)}\n\n"
                    if b["chunk_delay"]:
                        await asyncio.sleep(b["chunk_delay"])
                if not ndjson:
                    yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                app.state.num_cancelled += 1
                raise
            finally:
                app.state.num_active -= 1

        ndjson = request.url.path == "/v1/chat/interactive"   # LMDeploy streams JSON lines there
        return StreamingResponse(events(), media_type="application/x-ndjson" if ndjson else "text/event-stream")

    for path in ROUTED:
        app.add_api_route(path, handle, methods=["POST"])
    return app


class ServerThread:
    """Runs an ASGI app with uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(self, app, port: int | None = None):
        self.app = app
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self, force: bool = False) -> None:
        self.server.should_exit = True
        self.server.force_exit = force
        self.thread.join(10)
