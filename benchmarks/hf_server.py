"""Baseline peer: Hugging Face transformers behind a minimal OpenAI /v1/completions, one request at a time.

This is what FastChat's model worker does (model.generate per request, serialized), so it is the
"no serving engine" reference for `benchmarks/run_peers.py`. Not part of the lmserve package.

    python benchmarks/hf_server.py --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8100
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer


def load(model_path: str):
    """A GGUF file (dequantized to fp32 by transformers) or an HF directory."""
    if model_path.endswith(".gguf"):
        d, f = os.path.dirname(model_path) or ".", os.path.basename(model_path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return tok, model.eval()


class _QueueStreamer(BaseStreamer):
    """Hands each generated token id to the event loop; the first put() is the prompt and is skipped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.seen_prompt = loop, queue, False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for t in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, t)

    def end(self):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return self.event.is_set()


def build_app(tok, model, model_name: str) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()  # NOTE: one generate() at a time, like FastChat's worker

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "hf-baseline"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            prompt = prompt[0]
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        input_ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        gen_kwargs = {"max_new_tokens": max_tokens, "do_sample": temperature > 0, "pad_token_id": tok.eos_token_id}
        if temperature > 0:
            gen_kwargs.update(temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        if body.get("ignore_eos"):
            gen_kwargs["min_new_tokens"] = max_tokens
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid = f"cmpl-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()

        async def run():
            """Yields token ids as generate() produces them, holding the lock throughout."""
            queue: asyncio.Queue = asyncio.Queue()
            cancel = threading.Event()
            async with lock:
                fut = loop.run_in_executor(None, lambda: model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), streamer=_QueueStreamer(loop, queue),
                    stopping_criteria=[_Cancelled(cancel)], logits_processor=LogitsProcessorList(), **gen_kwargs))
                try:
                    while (t := await queue.get()) is not None:
                        yield t
                finally:
                    cancel.set()
                    await fut

        def chunk(text: str, finish: str | None, usage: dict | None = None) -> str:
            c = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                 "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                c["choices"], c["usage"] = [], usage
            return f"data: {json.dumps(c)}\n\n"

        def finish_reason(ids: list[int]) -> str:
            return "stop" if ids and ids[-1] == tok.eos_token_id and len(ids) < max_tokens else "length"

        def usage(ids: list[int]) -> dict:
            n_in = input_ids.shape[1]
            return {"prompt_tokens": n_in, "completion_tokens": len(ids), "total_tokens": n_in + len(ids)}

        if not body.get("stream"):
            ids = [t async for t in run()]
            text = tok.decode(ids, skip_special_tokens=True)
            return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                                 "model": model_name, "usage": usage(ids),
                                 "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(ids)}]})

        async def sse():
            ids: list[int] = []
            sent = ""
            async for t in run():
                ids.append(t)
                text = tok.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):   # a partial UTF-8 character: wait for the rest
                    continue
                yield chunk(text[len(sent):], None)
                sent = text
            yield chunk("", finish_reason(ids))
            if include_usage:
                yield chunk("", None, usage(ids))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file or HF directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--served-model-name", default=None)
    args = ap.parse_args()
    tok, model = load(args.model)
    name = args.served_model_name or os.path.basename(args.model.rstrip("/"))
    uvicorn.run(build_app(tok, model, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
