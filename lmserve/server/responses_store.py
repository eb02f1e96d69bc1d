"""The Responses API's state: responses kept in memory (LRU, at most --responses-store-size) so that
`previous_response_id` continues a conversation and GET / DELETE / input_items / cancel find them. A response is
stored when it is created (status in_progress), so it can be cancelled while it generates; it is updated when it
ends. Nothing survives a restart; an evicted id is a 404 like an unknown one."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from lmserve.server.errors import APIError


@dataclass
class StoredResponse:
    response: dict[str, Any]                 # the Response object as last sent
    input_items: list[dict[str, Any]]        # this turn's input items, with ids
    history: list[dict[str, Any]]            # chat messages of the whole conversation, this turn's output included
    request_id: str | None = None            # engine request id while generating
    is_cancelled: bool = False


class ResponsesStore:
    def __init__(self, max_size: int = 1024):
        self.max_size = max_size
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._running: dict[str, StoredResponse] = {}     # cancel must find a running response even if evicted

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, entry: StoredResponse, keep: bool = True) -> None:
        if entry.request_id is not None:
            self._running[response_id] = entry
        if not keep:
            return
        self._items[response_id] = entry
        self._items.move_to_end(response_id)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def finished(self, response_id: str) -> None:
        entry = self._running.pop(response_id, None)
        if entry is not None:
            entry.request_id = None

    def get(self, response_id: str, param: str = "response_id") -> StoredResponse:
        entry = self._items.get(response_id)
        if entry is None:
            raise APIError(404, f"No response found with id '{response_id}' (unknown, not stored with store=true, "
                                "deleted, or evicted from the in-memory store)", param=param, code="not_found")
        self._items.move_to_end(response_id)
        return entry

    def running(self, response_id: str) -> StoredResponse | None:
        return self._running.get(response_id)

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._items[response_id]
