"""`lmserve bench serve`: an async load generator for any OpenAI-compatible server.

Each request streams (SSE) from /v1/completions or /v1/chat/completions; we time the first content chunk
(TTFT), every later chunk (ITL) and the end (E2E). Token counts come from the server's `usage` when it sends one
(stream_options.include_usage) and from our tokenizer otherwise. Arrivals are Poisson at --request-rate
(inf = all at once) and --max-concurrency caps requests in flight.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from lmserve.bench.datasets import BenchTokenizer, SampleRequest, build_requests, get_tokenizer
from lmserve.bench.metrics import compute_metrics, format_report, format_sweep_table


@dataclass
class RequestInput:
    api_url: str
    endpoint: str              # /v1/completions or /v1/chat/completions
    model: str
    prompt: str
    prompt_len: int
    output_len: int
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)


@dataclass
class RequestResult:
    success: bool = False
    generated_text: str = ""
    prompt_len: int = 0
    output_len: int = 0                 # tokens; 0 until counted
    usage_reported: bool = False        # output_len came from the server's usage
    ttft: float = 0.0                   # seconds
    itl: list[float] = field(default_factory=list)   # gaps between content chunks after the first
    latency: float = 0.0                # end to end, seconds
    start_time: float = 0.0             # when it was sent, seconds after the run's start
    finish_reason: str | None = None
    error: str = ""


def _payload(req: RequestInput) -> dict:
    body = {"model": req.model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if req.endpoint.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if req.ignore_eos:
        # vLLM, llama.cpp's server and ours read ignore_eos; min_tokens also holds it where only that is known.
        body["ignore_eos"] = True
        body["min_tokens"] = req.output_len
    body.update(req.extra_body)
    return body


def _chunk_text(chunk: dict, is_chat: bool) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if is_chat:
            delta = choice.get("delta") or {}
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text += choice.get("text") or ""
    return text


async def send_request(client: httpx.AsyncClient, req: RequestInput, pbar=None) -> RequestResult:
    """One streamed request; never raises (errors land in RequestResult.error)."""
    res = RequestResult(prompt_len=req.prompt_len)
    is_chat = req.endpoint.endswith("/chat/completions")
    st = res.start_time = time.perf_counter()
    most_recent = st
    saw_done = False
    try:
        async with client.stream("POST", req.api_url, json=_payload(req)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {resp.status_code}: {body[:500]}"
                return res
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line or line.startswith(":") or not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    saw_done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:500]}"
                    return res
                now = time.perf_counter()
                text = _chunk_text(chunk, is_chat)
                for choice in chunk.get("choices") or []:
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
                if text:
                    if res.ttft == 0.0:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - most_recent)
                    most_recent = now
                    res.generated_text += text
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.output_len = int(usage["completion_tokens"])
                    res.usage_reported = True
                    if usage.get("prompt_tokens"):
                        res.prompt_len = int(usage["prompt_tokens"])
        res.latency = time.perf_counter() - st
        if res.ttft == 0.0:
            res.error = "no content in the stream"
        elif not saw_done:
            res.error = "stream ended without [DONE]"
        else:
            res.success = True
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if pbar is not None:
            pbar.update(1)
    return res


async def _arrivals(num: int, request_rate: float, rng: random.Random):
    """Yields request indexes with exponential gaps (a Poisson process); all at once when the rate is inf."""
    for i in range(num):
        yield i
        if request_rate != float("inf") and i < num - 1:
            await asyncio.sleep(rng.expovariate(request_rate))


async def run_benchmark(*, base_url: str, endpoint: str, model: str, requests: list[SampleRequest],
                        tokenizer: BenchTokenizer | None, max_concurrency: int | None = None,
                        request_rate: float = float("inf"), ignore_eos: bool = False, seed: int = 0,
                        extra_body: dict | None = None, num_warmups: int = 1, request_timeout: float = 3600.0,
                        disable_tqdm: bool = False) -> tuple[dict, list[RequestResult]]:
    """Run one load level. Returns (metrics dict, per-request results)."""
    api_url = base_url.rstrip("/") + endpoint
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(request_timeout, connect=30.0)
    inputs = [RequestInput(api_url, endpoint, model, r.prompt, r.prompt_len, r.expected_output_len, ignore_eos,
                           dict(extra_body or {})) for r in requests]
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        for _ in range(num_warmups):
            warm = RequestInput(**{**asdict(inputs[0]), "output_len": min(4, inputs[0].output_len),
                                   "ignore_eos": False})
            out = await send_request(client, warm)
            if not out.success:
                raise RuntimeError(f"warmup request to {api_url} failed: {out.error}")

        pbar = None
        if not disable_tqdm:
            from tqdm.asyncio import tqdm
            pbar = tqdm(total=len(inputs), desc=f"c={max_concurrency or 'inf'}", file=sys.stderr)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def limited(req: RequestInput) -> RequestResult:
            if sem is None:
                return await send_request(client, req, pbar)
            async with sem:
                return await send_request(client, req, pbar)

        rng = random.Random(seed)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        tasks = []
        async for i in _arrivals(len(inputs), request_rate, rng):
            tasks.append(asyncio.create_task(limited(inputs[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        client_cpu_s = time.process_time() - cpu0
        if pbar is not None:
            pbar.close()

    for r in results:
        r.start_time -= t0
        if r.success and not r.usage_reported:
            r.output_len = len(tokenizer.encode(r.generated_text)) if tokenizer else len(r.itl) + 1
    metrics = compute_metrics(results, duration)
    metrics.update(max_concurrency=max_concurrency, request_rate=request_rate, client_cpu_s=round(client_cpu_s, 3),
                   usage_from_server=all(r.usage_reported for r in results if r.success))
    if ignore_eos:
        short = sum(1 for r, i in zip(results, inputs) if r.success and r.output_len < i.output_len)
        metrics["num_short_outputs"] = short
    return metrics, results


def fetch_model_id(base_url: str) -> str:
    """The first model the server lists, as vLLM's bench does when --model is not given."""
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30.0, trust_env=False)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def wait_for_server(base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base_url.rstrip("/") + "/v1/models", timeout=5.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {base_url} not ready after {timeout:.0f}s")
        time.sleep(1.0)


def _parse_concurrency_list(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"bench: --sweep-concurrency wants integers like 1,4,16,64, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise SystemExit("bench: --sweep-concurrency levels must be >= 1")
    return levels


def main(args) -> int:
    if args.wait_ready:
        wait_for_server(args.base_url, args.wait_ready)
    model = args.model or fetch_model_id(args.base_url)
    tokenizer = get_tokenizer(args.tokenizer)
    extra_body = json.loads(args.extra_body) if args.extra_body else {}
    settings = {k: getattr(args, k) for k in ("base_url", "endpoint", "dataset", "dataset_path", "input_len",
                                              "output_len", "prefix_len", "ignore_eos", "seed", "request_rate")}
    settings.update(model=model, tokenizer=args.tokenizer, label=args.label, extra_body=extra_body)

    levels = _parse_concurrency_list(args.sweep_concurrency) if args.sweep_concurrency else [args.max_concurrency]
    runs = []
    for level in levels:
        num_prompts = args.num_prompts or (max(2 * level, 8) if args.sweep_concurrency else 100)
        requests = build_requests(args, tokenizer, num_prompts)
        metrics, results = asyncio.run(run_benchmark(
            base_url=args.base_url, endpoint=args.endpoint, model=model, requests=requests, tokenizer=tokenizer,
            max_concurrency=level, request_rate=args.request_rate, ignore_eos=args.ignore_eos, seed=args.seed,
            extra_body=extra_body, num_warmups=args.num_warmups, request_timeout=args.request_timeout,
            disable_tqdm=args.disable_tqdm))
        print(format_report(metrics, title=f"{args.label or model} @ max_concurrency={level or 'inf'}"))
        run = {"metrics": metrics}
        if args.save_detailed:
            run["requests"] = [asdict(r) for r in results]
        runs.append(run)

    result = {"settings": settings, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": runs}
    if len(runs) > 1:
        print(format_sweep_table([r["metrics"] for r in runs], title=args.label or model))
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result, f, indent=2)
        print(f"saved {args.save_result}")
    if args.plot:
        from lmserve.bench.plot import plot_results
        plot_results([result], args.plot)
        print(f"saved {args.plot}")
    return 1 if any(r["metrics"]["completed"] == 0 for r in runs) else 0
