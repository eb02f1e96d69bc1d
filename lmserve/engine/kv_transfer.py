"""KV migration over TCP with ZeroMQ: the prefill server's block server and the decode server's puller.

A prefill server binds one ROUTER socket (lazily, at the first /distserve/p2p_initialize); each migration on a
decode server opens its own DEALER socket, so concurrent pulls never share a socket. Messages:

  [JSON {"op": "hello"}]                                   -> [JSON {"layout": ...}]
  [JSON {"op": "read", "session_id", "start", "count"}]    -> [JSON {"start", "count"}, frames...] or [JSON {"error"}]
  [JSON {"op": "free", "session_id"}]                      -> [JSON {"freed": bool}]

A read returns whole blocks: for each block, for each layer, its K then its V rows (`block_size` tokens of this
rank's KV heads), one frame each, sent zero-copy from the KV cache. The puller keeps `window` reads in flight, so
the network and the prefill server's sends overlap. Only blocks pinned under the named session can be read: the
prefill server maps (session, index) to its own block ids, never trusting a block id from the wire.
"""
from __future__ import annotations

import json
import logging
import threading
import warnings
from typing import Callable

import torch
import zmq

logger = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    """A migration failed; `status` and `param` become the HTTP error the serving layer returns."""

    def __init__(self, message: str, status: int = 502, param: str | None = "migration_request"):
        super().__init__(message)
        self.status, self.param = status, param


def kv_layout(runner) -> dict:
    """What two peers must agree on to copy blocks byte for byte."""
    k = runner.kv_caches[0][0] if runner.kv_caches else None
    heads, head_dim = (k.shape[1], k.shape[2]) if k is not None else (None, runner.arch.head_dim)
    return {"block_size": runner.block_size, "dtype": str(runner.kv_dtype).replace("torch.", ""),
            "num_layers": runner.arch.num_hidden_layers, "num_kv_heads": heads, "head_dim": head_dim}


def layout_mismatch(local: dict, remote: dict) -> str | None:
    """The first field two layouts differ in, as a sentence; None when they match."""
    for key in ("block_size", "dtype", "num_layers", "num_kv_heads", "head_dim"):
        if local.get(key) != remote.get(key):
            return f"KV {key} differs: this engine has {local.get(key)!r}, the remote engine {remote.get(key)!r}"
    return None


def block_frames(runner, block_id: int) -> list:
    """Zero-copy views of one block: K then V of every layer, `block_size` rows each."""
    bs = runner.block_size
    frames = []
    for k, v in runner.kv_caches:
        for t in (k, v):
            frames.append(t[block_id * bs:(block_id + 1) * bs].view(torch.uint8).numpy())
    return frames


def write_blocks(runner, block_ids: list[int], blocks: list[list]) -> None:
    """Copy pulled blocks (as `block_frames` sent them) into this engine's KV cache. Engine thread only."""
    bs = runner.block_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # read-only zmq buffers: we only read them
        for block_id, frames in zip(block_ids, blocks):
            for layer, (k, v) in enumerate(runner.kv_caches):
                for j, t in enumerate((k, v)):
                    src = torch.frombuffer(frames[2 * layer + j], dtype=torch.uint8)
                    t[block_id * bs:(block_id + 1) * bs].view(torch.uint8).view(-1).copy_(src)


class BlockServer:
    """Prefill side: serves reads of pinned blocks from a background thread.

    `lookup(session_id)` gives the session's pinned block ids (or None); `on_free(session_id)` queues the free on
    the engine thread; `on_read(session_id)` runs before each read (it keeps the session alive);
    `explain(session_id)` says why a session's blocks were freed early (or None).
    Reading while the engine runs is safe: a pinned block is never written."""

    def __init__(self, runner, host: str, lookup: Callable[[int], list[int] | None],
                 on_free: Callable[[int], None], on_read: Callable[[int], None] = lambda sid: None,
                 explain: Callable[[int], str | None] = lambda sid: None):
        self.runner, self.lookup, self.on_free = runner, lookup, on_free
        self.on_read, self.explain = on_read, explain
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        try:
            port = self.sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError:   # a host name zmq cannot bind: listen everywhere, advertise the name
            port = self.sock.bind_to_random_port("tcp://*")
        self.address = f"tcp://{host}:{port}"
        self.num_bytes_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="lmserve-kv-server", daemon=True)
        self._thread.start()
        logger.info("KV migration server listening on %s", self.address)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        self.ctx.term()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(200):
                continue
            ident, *parts = self.sock.recv_multipart()
            try:
                reply = self._handle(json.loads(parts[0]) if parts else {})
            except Exception as e:  # noqa: BLE001 - a bad message gets an error reply, the server keeps serving
                reply = [json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()]
            self.sock.send_multipart([ident, *reply], copy=False)

    def _handle(self, msg: dict) -> list:
        op = msg.get("op")
        if op == "hello":
            return [json.dumps({"layout": kv_layout(self.runner)}).encode()]
        session_id = msg.get("session_id")
        if op == "read" and isinstance(session_id, int):
            self.on_read(session_id)
        blocks = self.lookup(session_id) if isinstance(session_id, int) else None
        if op == "free":
            if blocks is not None:
                self.on_free(session_id)
            return [json.dumps({"freed": blocks is not None}).encode()]
        if op != "read":
            return [json.dumps({"error": f"unknown op {op!r}"}).encode()]
        if blocks is None:
            why = self.explain(session_id) if isinstance(session_id, int) else None
            if why:     # not the client's fault: a 503, with the reason
                return [json.dumps({"error": f"the KV blocks of session {session_id} were freed: {why}",
                                    "unavailable": True}).encode()]
            return [json.dumps({"error": f"no KV blocks are kept for session {session_id}",
                                "param": "remote_session_id"}).encode()]
        start, count = int(msg["start"]), int(msg["count"])
        if start < 0 or count < 1 or start + count > len(blocks):
            return [json.dumps({"error": f"blocks [{start}, {start + count}) are out of range: the session keeps "
                                         f"{len(blocks)}", "param": "remote_block_ids"}).encode()]
        frames = [f for b in blocks[start:start + count] for f in block_frames(self.runner, b)]
        self.num_bytes_sent += sum(f.nbytes for f in frames)
        return [json.dumps({"start": start, "count": count}).encode(), *frames]


def hello(address: str, timeout: float) -> dict:
    """The remote block server's KV layout; MigrationError when it does not answer within `timeout` s."""
    with _Dealer(address) as sock:
        sock.send_json({"op": "hello"})
        return _recv(sock, timeout, address)[0]["layout"]


def pull_blocks(address: str, session_id: int, num_blocks: int, timeout: float, chunk: int = 4,
                window: int = 4) -> list[list]:
    """Read `num_blocks` blocks of a session, `chunk` blocks per read, `window` reads in flight, then free them on
    the prefill server. Returns per block its frames. MigrationError when the peer is silent for `timeout` s."""
    blocks: list[list | None] = [None] * num_blocks
    starts = list(range(0, num_blocks, chunk))
    with _Dealer(address) as sock:
        sent = received = 0
        while received < len(starts):
            while sent < len(starts) and sent - received < window:
                start = starts[sent]
                sock.send_json({"op": "read", "session_id": session_id, "start": start,
                                "count": min(chunk, num_blocks - start)})
                sent += 1
            header, frames = _recv(sock, timeout, address)
            per_block = len(frames) // header["count"]
            for i in range(header["count"]):
                blocks[header["start"] + i] = frames[i * per_block:(i + 1) * per_block]
            received += 1
        sock.send_json({"op": "free", "session_id": session_id})
        _recv(sock, timeout, address)
    return blocks


class _Dealer:
    def __init__(self, address: str):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def __enter__(self):
        return self.sock

    def __exit__(self, *exc):
        self.sock.close()


def _recv(sock, timeout: float, address: str) -> tuple[dict, list]:
    if not sock.poll(int(timeout * 1000)):
        raise MigrationError(f"the prefill engine's KV server at {address} did not answer within {timeout:g} s",
                             status=502, param="migration_request.remote_engine_id")
    header, *frames = sock.recv_multipart(copy=False)
    msg = json.loads(header.bytes)
    if "error" in msg:
        param = msg.get("param")
        status = 503 if msg.get("unavailable") else 400 if param else 502
        raise MigrationError(f"KV migration refused: {msg['error']}", status=status,
                             param=f"migration_request.{param}" if param else "migration_request")
    return msg, [f.buffer for f in frames]
