"""A cancel that races the last token: once POST /v1/responses/{id}/cancel has answered "cancelled", the response ends
cancelled (stream: response.failed), even where the engine's final output was already on its way (finish reason
stop, not abort). Without this the client was told "cancelled" and the stream then said response.completed."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from lmserve.outputs import CompletionOutput, FinishReason, RequestOutput
from lmserve.server.protocol.responses import ResponsesRequest
from lmserve.server.responses_store import ResponsesStore, StoredResponse
from lmserve.server.serving_responses import ResponseRun, cancel_response


class _Engine:
    def __init__(self):
        self.aborted = []

    async def abort(self, request_id):
        self.aborted.append(request_id)


def _run(store: bool):
    state = SimpleNamespace(model_name="m", responses=ResponsesStore(), engine=_Engine(), tokenizer=None)
    job = SimpleNamespace(output=SimpleNamespace(split=lambda text, final: SimpleNamespace(
        reasoning="", content=text, calls=[])), num_prompt_tokens=3)
    req = ResponsesRequest(model="m", input="hi", store=store)
    run = ResponseRun(state, req, job, [], "resp_1")
    run.entry = run.tracked = StoredResponse(run.response("in_progress"), [], [], request_id="req_1")
    state.responses.put("resp_1", run.entry, keep=store)
    if not store:
        run.entry = None
    return state, run


def _finished(reason: FinishReason) -> RequestOutput:
    return RequestOutput("req_1", [1, 2, 3], [CompletionOutput(0, "Once upon", [5, 6], finish_reason=reason)], True)


def test_a_cancel_before_the_final_output_wins_over_its_finish_reason():
    for store in (True, False):
        state, run = _run(store)
        answer = asyncio.run(cancel_response(state, "resp_1"))
        assert answer["status"] == "cancelled" and state.engine.aborted == ["req_1"]
        final = run.final(_finished(FinishReason.STOP))     # the last token was out before the abort took
        assert final["status"] == "cancelled" and final["error"]["code"] == "cancelled", store
        assert final["incomplete_details"] is None


def test_without_a_cancel_the_finish_reason_decides():
    state, run = _run(True)
    assert run.final(_finished(FinishReason.STOP))["status"] == "completed"
    state, run = _run(True)
    assert run.final(_finished(FinishReason.LENGTH))["status"] == "incomplete"
    state, run = _run(True)
    assert run.final(_finished(FinishReason.ABORT))["status"] == "cancelled"
