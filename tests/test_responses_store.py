"""The Responses store on its own: LRU bound (--responses-store-size), 404s in OpenAI's shape, running responses
findable for cancel even when not stored."""
from __future__ import annotations

import pytest

from lmserve.server.errors import APIError
from lmserve.server.responses_store import ResponsesStore, StoredResponse


def entry(request_id: str | None = None) -> StoredResponse:
    return StoredResponse(response={"status": "in_progress"}, input_items=[], history=[], request_id=request_id)


def test_lru_eviction_and_404():
    store = ResponsesStore(max_size=2)
    for rid in ("a", "b"):
        store.put(rid, entry())
    store.get("a")                 # a is now the most recently used: b goes first
    store.put("c", entry())
    assert len(store) == 2 and store.get("a") and store.get("c")
    with pytest.raises(APIError) as e:
        store.get("b", "previous_response_id")
    assert e.value.status == 404 and e.value.param == "previous_response_id" and "evicted" in e.value.message
    store.delete("a")
    with pytest.raises(APIError):
        store.delete("a")


def test_running_responses_are_found_until_finished():
    store = ResponsesStore(max_size=1)
    store.put("r1", entry("r1"), keep=False)        # store=false: not kept, but cancellable while it runs
    assert store.running("r1") is not None
    with pytest.raises(APIError):
        store.get("r1")
    store.finished("r1")
    assert store.running("r1") is None
