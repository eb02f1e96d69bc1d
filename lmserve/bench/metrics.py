"""Benchmark metrics from per-request results, and their text report.

Definitions (as vLLM's `bench serve`): TTFT = send -> first content chunk; TPOT = (E2E - TTFT) / (output
tokens - 1) per request; ITL = gaps between content chunks; E2E = send -> end of stream. Throughputs are over
the wall time of the whole run, completed requests only.
"""
from __future__ import annotations

import statistics

STATS = ("mean", "median", "p90", "p99")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without needing numpy."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values_s: list[float]) -> dict[str, float]:
    """mean/median/p90/p99 in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    return {"mean": statistics.fmean(ms) if ms else 0.0, "median": percentile(ms, 50),
            "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


def compute_metrics(results, duration_s: float) -> dict:
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itls = [gap for r in ok for gap in r.itl]
    finish_reasons: dict[str, int] = {}
    for r in ok:
        finish_reasons[str(r.finish_reason)] = finish_reasons.get(str(r.finish_reason), 0) + 1
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error[:200]] = errors.get(r.error[:200], 0) + 1
    return {
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "finish_reasons": finish_reasons,
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": total_output / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (total_input + total_output) / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": summarize([r.ttft for r in ok]),
        "tpot_ms": summarize(tpots),
        "itl_ms": summarize(itls),
        "e2e_ms": summarize([r.latency for r in ok]),
        # Single-stream decode speed each request saw, averaged: 1 / TPOT.
        "mean_decode_tok_s_per_request": (statistics.fmean(1.0 / t for t in tpots if t > 0)
                                          if any(t > 0 for t in tpots) else 0.0),
    }


def format_report(m: dict, title: str = "") -> str:
    w = 50
    lines = ["", f"{' Serving Benchmark Result ':=^{w}}"]
    if title:
        lines.append(title[:w])
    rows = [
        ("Successful requests:", m["completed"]),
        ("Failed requests:", m["failed"]),
        ("Max concurrency:", m.get("max_concurrency") or "inf"),
        ("Benchmark duration (s):", f"{m['duration_s']:.2f}"),
        ("Total input tokens:", m["total_input_tokens"]),
        ("Total generated tokens:", m["total_output_tokens"]),
        ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
        ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}"),
        ("Per-request decode speed (tok/s):", f"{m['mean_decode_tok_s_per_request']:.2f}"),
    ]
    if "client_cpu_s" in m:
        rows.append(("Bench client CPU (s):", f"{m['client_cpu_s']:.2f}"))
    lines += [f"{k:<36}{v:>14}" for k, v in rows]
    for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                      ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        lines.append(f"{' ' + name + ' ':-^{w}}")
        for stat in STATS:
            label = f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {key[:-3].upper()} (ms):"
            lines.append(f"{label:<36}{m[key][stat]:>14.2f}")
    if m["errors"]:
        lines.append(f"{' Errors ':-^{w}}")
        lines += [f"{n} x {err}" for err, n in list(m["errors"].items())[:5]]
    if m.get("num_short_outputs"):
        lines.append(f"NOTE: {m['num_short_outputs']} requests stopped before --output-len despite --ignore-eos")
    lines.append("=" * w)
    return "\n".join(lines)


def format_sweep_table(runs: list[dict], title: str = "") -> str:
    head = (f"{'conc':>5} {'ok':>5} {'fail':>4} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'TPOT p50':>9} {'E2E p50':>9} {'E2E p99':>9}")
    lines = ["", f"sweep: {title}" if title else "sweep", head, "-" * len(head)]
    for m in runs:
        lines.append(f"{m.get('max_concurrency') or 'inf':>5} {m['completed']:>5} {m['failed']:>4} "
                     f"{m['output_throughput']:>10.2f} {m['request_throughput']:>7.3f} "
                     f"{m['ttft_ms']['median']:>9.1f} {m['ttft_ms']['p99']:>9.1f} {m['tpot_ms']['median']:>9.1f} "
                     f"{m['e2e_ms']['median']:>9.1f} {m['e2e_ms']['p99']:>9.1f}")
    lines.append("(latencies in ms)")
    return "\n".join(lines)
