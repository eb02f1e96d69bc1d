"""Turn-N time to first token of an interactive session vs the history length.

With `/v1/chat/interactive` + `interactive_mode: true` the server keeps the session's tokens and the engine its KV
blocks, so turn N prefills only its new tokens. Re-sending the whole conversation to /v1/chat/completions without
prefix caching prefills the whole history every turn.

As a script it prints the table recorded in docs/benchmarks.md:
    python tests/test_api_session_ttft.py --url http://127.0.0.1:23333 --turns 12 [--mode interactive|resend]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
import pytest

TURN = "Here is one more line of our long conversation about the sea, the ships and the weather. " * 3


def interactive_turns(url: str, num_turns: int, session_id: int = 31337, new_tokens: int = 16) -> list[dict]:
    """Each turn: send only the new text; TTFT = time to the first streamed line."""
    rows = []
    try:
        for turn in range(num_turns):
            body = {"prompt": f"{turn}. {TURN}", "session_id": session_id, "interactive_mode": True, "stream": True,
                    "request_output_len": new_tokens, "ignore_eos": True, "temperature": 0}
            t0 = time.perf_counter()
            with httpx.stream("POST", f"{url}/v1/chat/interactive", json=body, timeout=300) as resp:
                lines = resp.iter_lines()
                first = json.loads(next(line for line in lines if line))
                ttft = time.perf_counter() - t0
                last = first
                for line in lines:
                    if line:
                        last = json.loads(line)
            if last["finish_reason"] == "length" and last["tokens"] == 0:
                break    # the session is full
            rows.append({"turn": turn + 1, "history_tokens": first["history_tokens"],
                         "new_tokens": first["input_tokens"], "ttft_s": ttft})
    finally:
        httpx.post(f"{url}/chat/reset", json={"session_id": session_id})
    return rows


def resend_turns(url: str, model: str, num_turns: int, new_tokens: int = 16) -> list[dict]:
    """Each turn re-sends the whole conversation to /v1/chat/completions (no session)."""
    messages, rows = [], []
    for turn in range(num_turns):
        messages.append({"role": "user", "content": f"{turn}. {TURN}"})
        body = {"model": model, "messages": messages, "max_tokens": new_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t0, ttft, text, usage = time.perf_counter(), None, "", None
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as resp:
            if resp.status_code != 200:
                break
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    text += chunk["choices"][0]["delta"]["content"]
                usage = chunk.get("usage") or usage
        messages.append({"role": "assistant", "content": text})
        rows.append({"turn": turn + 1, "history_tokens": usage["prompt_tokens"],
                     "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "ttft_s": ttft})
    return rows


def _ttft_interactive(url: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/interactive", json={**body, "stream": True}, timeout=600) as resp:
        lines = resp.iter_lines()
        first = json.loads(next(line for line in lines if line))
        ttft = time.perf_counter() - t0
        for _ in lines:
            pass
    return ttft, first


def _ttft_chat(url: str, body: dict) -> float:
    t0, ttft = time.perf_counter(), None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.read().decode()}")
        for line in resp.iter_lines():
            if ttft is None and line.startswith("data: {") and "role" not in json.loads(line[6:])["choices"][0][
                    "delta"]:   # the first token's chunk
                ttft = time.perf_counter() - t0
    return ttft


def sweep(url: str, model: str, history_lengths: list[int], trials: int = 3) -> list[dict]:
    """TTFT of the turn after a history of ~H tokens: with the session vs re-sending it all (cold cache)."""
    rows = []
    for h in history_lengths:
        session, cold = [], []
        for trial in range(trials):
            # NOTE: a unique first word makes every block of the history new to the prefix cache
            history = f"Run {h}.{trial}.{time.time_ns()}:" + " sea" * h
            sid = 40000 + h * 10 + trial
            try:
                _, _ = _ttft_interactive(url, {"prompt": history, "session_id": sid, "interactive_mode": True,
                                               "request_output_len": 1, "ignore_eos": True, "temperature": 0})
                ttft, first = _ttft_interactive(url, {"prompt": TURN, "session_id": sid, "interactive_mode": True,
                                                      "request_output_len": 4, "ignore_eos": True,
                                                      "temperature": 0})
                session.append(ttft)
                hist_tokens = first["history_tokens"]
            finally:
                httpx.post(f"{url}/chat/reset", json={"session_id": sid})
            history = f"Run {h}.{trial}.{time.time_ns()}:" + " sea" * h
            messages = [{"role": "user", "content": history}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": TURN}]
            cold.append(_ttft_chat(url, {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0,
                                         "ignore_eos": True}))
        rows.append({"history_tokens": hist_tokens, "session_ms": statistics.median(session) * 1000,
                     "resend_ms": statistics.median(cold) * 1000})
    return rows


@pytest.mark.slow
def test_turn_n_ttft_does_not_grow_with_history(api_server_url):
    rows = interactive_turns(api_server_url, 10)
    assert len(rows) == 10 and rows[-1]["history_tokens"] > 700
    assert all(r["new_tokens"] < 100 for r in rows[1:])    # only the new turn is sent and prefilled
    early = statistics.median(r["ttft_s"] for r in rows[1:4])
    late = statistics.median(r["ttft_s"] for r in rows[-3:])
    # NOTE: loose, the CPU is shared; re-prefilling 700+ tokens takes several times longer
    assert late < max(3 * early, early + 0.5), rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:23333")
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--mode", choices=("interactive", "resend", "sweep"), default="interactive")
    ap.add_argument("--history", default="0,256,512,1024,2048,3072", help="sweep: history lengths (tokens)")
    args = ap.parse_args()
    model = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    if args.mode == "sweep":
        print("| history tokens | turn TTFT, session (ms) | turn TTFT, history re-sent (ms) |")
        print("|---:|---:|---:|")
        for r in sweep(args.url, model, [int(x) for x in args.history.split(",")]):
            print(f"| {r['history_tokens']} | {r['session_ms']:.0f} | {r['resend_ms']:.0f} |")
        raise SystemExit(0)
    rows = interactive_turns(args.url, args.turns) if args.mode == "interactive" else \
        resend_turns(args.url, model, args.turns)
    print("| turn | history tokens | TTFT (ms) |")
    print("|---:|---:|---:|")
    for r in rows:
        print(f"| {r['turn']} | {r['history_tokens']} | {r['ttft_s'] * 1000:.0f} |")
