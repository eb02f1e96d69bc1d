"""real_size.json -> a markdown table (best of the alternating rounds per server) with lmserve / llama.cpp ratios.

    python benchmarks/real_size_report.py bench_results/real_size/real_size.json
"""
from __future__ import annotations

import json
import sys

GIB = 2**30
# (metric, better): the best value over a server's rounds
METRICS = {"c1_decode_tok_s": max, "c16_output_tok_s": max, "c1_ttft_ms": min, "pp512_tok_s": max,
           "startup_s": min}


def best(rows: list[dict]) -> dict:
    ok = rows      # a run killed midway still measured what it finished; its error is shown with the row
    out: dict = {"rounds": len(rows), "errors": [r["error"] for r in rows if "error" in r]}
    for key, pick in METRICS.items():
        vals = [r[key] for r in ok if r.get(key) is not None]
        out[key] = pick(vals) if vals else None
    # memory: the largest seen (the conservative figure), not the best
    for when in ("mem_after_start", "mem_after_run"):
        vals = [r[when] for r in ok if r.get(when)]
        out[when] = max(vals, key=lambda m: m["rss"]) if vals else None
    peaks = [r.get("peak_rss") for r in ok if r.get("peak_rss")]
    out["peak_rss"] = max(peaks) if peaks else None
    loads = [r["loadavg_before"][0] for r in rows]
    out["load"] = (min(loads), max(loads)) if loads else None
    return out


def _f(x, fmt="{:.1f}"):
    return "—" if x is None else fmt.format(x)


def _mem(m):
    return "—" if not m else f"{m['rss'] / GIB:.2f} / {m['pss'] / GIB:.2f}"


def _ratio(a, b, fmt="{:.2f}x"):
    return "—" if not a or not b else fmt.format(a / b)


def markdown(data: dict) -> str:
    m = data["machine"]
    bw = data["read_bandwidth_gb_s"]
    lines = [f"Machine: {m['model']}, {m['cores']} cores, {data.get('mem_total_gib', '?')} GiB; ISA flags: "
             f"{' '.join(m['isa'])}. Read bandwidth (sum over 2 GiB, best of 5): "
             f"{', '.join(f'{k} {v} GB/s' for k, v in bw.items())} at the start; "
             f"{', '.join(f'{k} {v} GB/s' for k, v in data.get('read_bandwidth_gb_s_end', {}).items())} at the end.",
             f"lmserve {data['lmserve']}; llama.cpp {data['llama_cpp']}; {data['date']}.", "",
             "| model | server | c=1 tok/s | % of bound | c=16 tok/s | TTFT ms (128) | pp512 tok/s (HTTP) | "
             "llama-bench tg128 / pp512 | RSS / PSS GiB after start | after run | peak RSS GiB | start s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bw_key = max(bw, key=bw.get)
    for model in data["models"]:
        bound = model["bound_tok_s"][bw_key]
        name = (f"{model['model']} ({model['file_bytes'] / GIB:.2f} GiB file, "
                f"{model['bytes_per_token'] / 1e9:.2f} GB/token, bound {bound:.1f} tok/s)")
        lb = model.get("llama_bench") or {}
        lb_cell = (f"{lb['tg128']['avg_ts']:.1f} / {lb['pp512']['avg_ts']:.1f}"
                   if "tg128" in lb and "pp512" in lb else "—")
        by_server = {}
        for server in dict.fromkeys(r["server"] for r in model["runs"]):
            b = best([r for r in model["runs"] if r["server"] == server])
            by_server[server] = b
            err = f" ({b['errors'][0].splitlines()[0][:120]})" if b["errors"] else ""
            lines.append(
                f"| {name} | {server}{err} | {_f(b['c1_decode_tok_s'])} | "
                f"{_f(b['c1_decode_tok_s'] and 100 * b['c1_decode_tok_s'] / bound, '{:.0f}%')} | "
                f"{_f(b['c16_output_tok_s'])} | {_f(b['c1_ttft_ms'], '{:.0f}')} | {_f(b['pp512_tok_s'])} | "
                f"{lb_cell if server == 'llama-server' else ''} | {_mem(b['mem_after_start'])} | "
                f"{_mem(b['mem_after_run'])} | {_f(b['peak_rss'] and b['peak_rss'] / GIB, '{:.2f}')} | "
                f"{_f(b['startup_s'])} | {_f(b['load'] and b['load'][0], '{:.1f}')}-"
                f"{_f(b['load'] and b['load'][1], '{:.1f}')} |")
            name = ""
        a, p = by_server.get("lmserve"), by_server.get("llama-server")
        if a and p:
            rss = [x["mem_after_run"]["rss"] if x["mem_after_run"] else None for x in (a, p)]
            lines.append(
                f"| | **lmserve / llama.cpp** | **{_ratio(a['c1_decode_tok_s'], p['c1_decode_tok_s'])}** | | "
                f"**{_ratio(a['c16_output_tok_s'], p['c16_output_tok_s'])}** | "
                f"{_ratio(a['c1_ttft_ms'], p['c1_ttft_ms'])} | {_ratio(a['pp512_tok_s'], p['pp512_tok_s'])} | | | "
                f"RSS {_ratio(*rss)} | | | |")
    lines += ["", "c=1: mean 1/TPOT over requests (128-token prompts, 128 output tokens, EOS ignored); "
              "c=16: output tokens/s of 16 requests in flight; pp512: 512 / TTFT of a 512-token prompt with one "
              "output token; bound: the larger measured read bandwidth / the GGUF's matrix bytes read per token; "
              "best of the alternating rounds, memory the largest seen; load: 1-min load average before each run."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
