"""`lmserve bench`: metrics math, datasets, SSE parsing and the CLI, against a real HTTP server on 127.0.0.1.

Until lmserve's api_server runs, the load generator is checked against a tiny FastAPI test double that streams
OpenAI-shaped SSE (it lives only here). The test against our real server is skipped until the server lands.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from fastapi import Request  # module level: handler annotations are resolved against module globals

from lmserve.bench import datasets, metrics
from lmserve.bench.serve import RequestResult, run_benchmark
from lmserve.cli import main as cli_main


# ---- a fake OpenAI-compatible streaming server -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """Streams `max_tokens` chunks of "tok " with a fixed gap. Model names switch behaviours:
    'no-usage' leaves out the usage chunk, 'fail' answers 500, 'early-eos' stops after 3 tokens,
    'cut' drops the stream after 2 tokens without [DONE]."""

    def __init__(self, gap_s: float = 0.002):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse

        self.gap_s = gap_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        async def handle(request: Request, is_chat: bool):
            body = await request.json()
            self.bodies.append(body)
            if body["model"] == "fail":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            n = body["max_tokens"] if body["model"] != "early-eos" else min(3, body["max_tokens"])
            finish = "stop" if body["model"] == "early-eos" else "length"

            async def stream():
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    for i in range(n):
                        await asyncio.sleep(self.gap_s)
                        choice = ({"index": 0, "delta": {"content": "tok "}} if is_chat
                                  else {"index": 0, "text": "tok "})
                        choice["finish_reason"] = finish if i == n - 1 else None
                        yield f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"
                        if body["model"] == "cut" and i == 1:
                            return
                    if body["model"] != "no-usage" and (body.get("stream_options") or {}).get("include_usage"):
                        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                        yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(stream(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await handle(request, True)

        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake_server():
    with FakeServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer():
    return datasets.get_tokenizer(None)


def _requests(n: int, output_len: int = 8) -> list[datasets.SampleRequest]:
    return [datasets.SampleRequest(f"prompt {i}", 3, output_len) for i in range(n)]


def _run(server, model="fake-model", n=8, output_len=8, **kw):
    kw.setdefault("disable_tqdm", True)
    return asyncio.run(run_benchmark(base_url=server.base_url, endpoint=kw.pop("endpoint", "/v1/completions"),
                                     model=model, requests=_requests(n, output_len), tokenizer=kw.pop("tok", None),
                                     **kw))


# ---- metrics ----------------------------------------------------------------------------------------------
def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert metrics.percentile(xs, 50) == 3.0
    assert metrics.percentile(xs, 90) == pytest.approx(4.6)
    assert metrics.percentile(xs, 99) == pytest.approx(4.96)
    assert metrics.percentile([], 50) == 0.0
    assert metrics.percentile([7.0], 99) == 7.0


def test_compute_metrics_from_known_results():
    ok = RequestResult(success=True, prompt_len=10, output_len=5, ttft=0.1, itl=[0.05] * 4, latency=0.3)
    ok2 = RequestResult(success=True, prompt_len=20, output_len=3, ttft=0.2, itl=[0.1] * 2, latency=0.4)
    bad = RequestResult(success=False, error="HTTP 500: boom")
    m = metrics.compute_metrics([ok, ok2, bad], duration_s=2.0)
    assert (m["completed"], m["failed"], m["errors"]) == (2, 1, {"HTTP 500: boom": 1})
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 8
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(150.0)
    # TPOT: (0.3-0.1)/4 = 50 ms and (0.4-0.2)/2 = 100 ms
    assert m["tpot_ms"]["mean"] == pytest.approx(75.0)
    assert m["itl_ms"]["median"] == pytest.approx(50.0)
    assert m["e2e_ms"]["p99"] == pytest.approx(399.0)
    report = metrics.format_report(m, title="t")
    assert "Failed requests:" in report and "P99 TTFT (ms):" in report and "HTTP 500" in report


# ---- datasets ---------------------------------------------------------------------------------------------
def test_random_prompts_have_the_requested_token_length(tokenizer):
    reqs = datasets.random_requests(tokenizer, 10, input_len=64, output_len=16, seed=3)
    assert len(reqs) == 10
    lens = [len(tokenizer.encode(r.prompt)) for r in reqs]
    assert lens == [r.prompt_len for r in reqs]
    assert all(abs(n - 64) <= 1 for n in lens), lens
    assert sum(n == 64 for n in lens) >= 8
    # Seeded: the same seed gives the same prompts.
    assert [r.prompt for r in datasets.random_requests(tokenizer, 10, 64, 16, seed=3)] == [r.prompt for r in reqs]


def test_prefix_repetition_shares_prefixes(tokenizer):
    reqs = datasets.prefix_repetition_requests(tokenizer, 12, input_len=16, output_len=8, prefix_len=48,
                                               num_prefixes=3, seed=0)
    heads = {r.prompt[:80] for r in reqs}
    assert len(heads) == 3
    assert all(abs(r.prompt_len - 64) <= 2 for r in reqs)
    with pytest.raises(ValueError):
        datasets.prefix_repetition_requests(tokenizer, 4, 16, 8, prefix_len=0)


def test_jsonl_dataset(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Hello there", "output_len": 5}\n\n{"prompt": "Bye"}\n')
    reqs = datasets.jsonl_requests(tokenizer, str(path), num_prompts=5, output_len=9)
    assert [r.expected_output_len for r in reqs] == [5, 9, 5, 9, 5]
    assert reqs[0].prompt_len == len(tokenizer.encode("Hello there"))
    path.write_text('{"text_missing": 1}\n')
    with pytest.raises(ValueError, match="prompt"):
        datasets.jsonl_requests(tokenizer, str(path), 1, 4)


# ---- the load generator against a real HTTP server ---------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_sse_parsing_and_usage(fake_server, endpoint):
    m, results = _run(fake_server, n=6, output_len=10, endpoint=endpoint, ignore_eos=True)
    assert m["completed"] == 6 and m["failed"] == 0
    assert m["usage_from_server"] is True
    for r in results:
        assert r.success and r.output_len == 10 and r.prompt_len == 7   # the server's usage wins
        assert r.generated_text == "tok " * 10
        assert len(r.itl) == 9 and r.ttft > 0 and r.latency >= r.ttft + sum(r.itl) - 1e-6
    assert m["total_output_tokens"] == 60 and m["num_short_outputs"] == 0
    assert m["finish_reasons"] == {"length": 6}
    body = fake_server.bodies[-1]
    assert body["stream"] is True and body["ignore_eos"] is True and body["stream_options"]["include_usage"]
    assert ("messages" in body) == endpoint.endswith("chat/completions")


def test_token_count_falls_back_to_the_tokenizer(fake_server, tokenizer):
    m, results = _run(fake_server, model="no-usage", n=3, output_len=6, tok=tokenizer)
    assert m["usage_from_server"] is False
    expected = len(tokenizer.encode("tok " * 6))
    assert all(r.output_len == expected for r in results)


def test_failed_requests_are_counted_not_raised(fake_server):
    with pytest.raises(RuntimeError, match="warmup"):
        _run(fake_server, model="fail", n=3)
    m, _ = _run(fake_server, model="fail", n=3, num_warmups=0)
    assert m["completed"] == 0 and m["failed"] == 3
    assert list(m["errors"]) == ['HTTP 500: {"error":{"message":"boom"}}']


def test_ignore_eos_reports_short_outputs(fake_server):
    m, _ = _run(fake_server, model="early-eos", n=4, output_len=8, ignore_eos=True)
    assert m["num_short_outputs"] == 4
    assert m["finish_reasons"] == {"stop": 4}


def test_stream_cut_off_counts_as_failed(fake_server):
    m, results = _run(fake_server, model="cut", n=3, output_len=8, num_warmups=0)
    assert m["failed"] == 3 and results[0].error == "stream ended without [DONE]"


def test_max_concurrency_is_respected(fake_server):
    fake_server.max_in_flight = 0
    m, _ = _run(fake_server, n=12, output_len=5, max_concurrency=3)
    assert m["completed"] == 12
    assert fake_server.max_in_flight == 3
    fake_server.max_in_flight = 0
    _run(fake_server, n=12, output_len=20)   # unbounded: all at once
    assert fake_server.max_in_flight == 12


def test_request_rate_spreads_arrivals(fake_server):
    _, results = _run(fake_server, n=10, output_len=2, request_rate=50.0, seed=1)
    starts = sorted(r.start_time for r in results)
    # 9 exponential gaps at 50/s: mean 0.18 s in all; the burst (rate inf) sends all within a few ms.
    assert starts[-1] - starts[0] > 0.03
    _, burst = _run(fake_server, n=10, output_len=2)
    assert max(r.start_time for r in burst) - min(r.start_time for r in burst) < starts[-1] - starts[0]


def _cli_sweep(fake_server, tmp_path, capsys) -> dict:
    out_json = tmp_path / "r.json"
    rc = cli_main(["bench", "serve", "--base-url", fake_server.base_url, "--input-len", "16", "--output-len", "6",
                   "--sweep-concurrency", "1,4", "--num-prompts", "8", "--ignore-eos", "--save-result",
                   str(out_json), "--label", "fake", "--disable-tqdm"])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["settings"]["model"] == "fake-model"         # from /v1/models
    assert [r["metrics"]["max_concurrency"] for r in result["runs"]] == [1, 4]
    assert all(r["metrics"]["completed"] == 8 and r["metrics"]["total_output_tokens"] == 48 for r in result["runs"])
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "sweep: fake" in text
    return result


def test_cli_sweep_saves_json(fake_server, tmp_path, capsys):
    _cli_sweep(fake_server, tmp_path, capsys)


def test_plot_of_a_sweep(fake_server, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs the [bench] extra")
    from lmserve.bench.plot import plot_results

    result = _cli_sweep(fake_server, tmp_path, capsys)
    out_png = tmp_path / "r.png"
    plot_results([result, {**result, "settings": {**result["settings"], "label": "other"}}], str(out_png))
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


# ---- the real lmserve server and engine ---------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_against_lmserve_api_server(api_server_url, tmp_path, endpoint):
    out = tmp_path / "real.json"
    rc = cli_main(["bench", "serve", "--base-url", api_server_url, "--endpoint", endpoint, "--input-len", "32",
                   "--output-len", "12", "--num-prompts", "6", "--max-concurrency", "3", "--ignore-eos",
                   "--save-result", str(out), "--disable-tqdm"])
    m = json.loads(out.read_text())["runs"][0]["metrics"]
    assert rc == 0 and m["completed"] == 6 and m["failed"] == 0, m["errors"]
    # Every stream ran to its full length: none was cut off by the others.
    assert m["total_output_tokens"] == 6 * 12 and m["num_short_outputs"] == 0
    assert m["usage_from_server"] is True and m["finish_reasons"] == {"length": 6}
    assert m["ttft_ms"]["p99"] > 0 and m["tpot_ms"]["median"] > 0


def test_bench_throughput_offline_engine(tiny_models, tmp_path, capsys):
    out = tmp_path / "tp.json"
    rc = cli_main(["bench", "throughput", tiny_models["llama"], "--num-prompts", "6", "--input-len", "24",
                   "--output-len", "8", "--ignore-eos", "--cache-block-count", "64", "--save-result", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["num_requests"] == 6
    assert r["total_output_tokens"] == 6 * 8
    assert abs(r["total_prompt_tokens"] - 6 * 24) <= 6
    assert r["output_throughput"] > 0 and "output tokens/s" in capsys.readouterr().out
