"""summary.json for benchmarks/run_peers.py: one entry per (peer, level), merged across runs, and lmserve's ratios.

A run that measures only some peers (say, the integrator rerunning the lmserve rows after the last merge) replaces
exactly those peers' levels and keeps every other entry, so a table can be completed piece by piece. Each entry
carries its own provenance (date, lmserve commit, load average before it ran), so a merged table shows which of
its rows come from which run; ratios are recomputed from the merged table every time.
"""
from __future__ import annotations

import json
import os
import subprocess

# the per-level figures kept from a `bench serve` run (its "metrics" dict)
_KEPT = ("output_throughput", "request_throughput", "completed", "failed", "num_short_outputs",
         "mean_decode_tok_s_per_request", "duration_s")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine() -> dict:
    """CPU model, the flags that decide our fast paths, core count: the table is meaningless without them."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": [f for f in _CPU_FLAGS if f in flags], "cores": os.cpu_count()}


def provenance(repo: str) -> dict:
    """Where a figure comes from: lmserve's commit (+dirty: uncommitted changes under lmserve/), time, load."""
    def git(*a):
        return subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", "lmserve"):   # the code being measured
        commit += "+dirty"
    import time
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit,
            "loadavg": [round(x, 2) for x in os.getloadavg()], "cpu": machine()["cpu"]}


def level_entry(metrics: dict, prov: dict) -> dict:
    e = {k: metrics[k] for k in _KEPT if k in metrics}
    e["ttft_ms"] = {k: metrics["ttft_ms"][k] for k in ("median", "p99")}
    e["itl_ms_p99"] = metrics["itl_ms"]["p99"]
    return {**e, **prov}


def load(path: str) -> dict:
    """The peers table of an earlier summary.json, or an empty one (no file, or the pre-merge format)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if "peers" not in old:
        print(f"-- {path} has no per-peer entries (older format): starting a new table")
        return {}
    return old["peers"]


def merge(old: dict, new: dict) -> dict:
    """old/new: peer -> {"levels": {level: entry}} or {"inproc": entry}; new replaces old per (peer, level)."""
    out = json.loads(json.dumps(old))   # deep copy; JSON keys are strings after a round trip anyway
    for name, entry in new.items():
        cur = out.setdefault(name, {})
        if "levels" in entry:
            cur.setdefault("levels", {}).update({str(c): v for c, v in entry["levels"].items()})
        if "inproc" in entry:
            cur["inproc"] = entry["inproc"]
    return out


def _levels(peers: dict) -> list[int]:
    return sorted({int(c) for e in peers.values() for c in e.get("levels", {})})


def ratios(peers: dict) -> dict:
    """Each lmserve variant's output throughput over each other peer's, per level; single stream vs in-process."""
    out = {}
    inproc = peers.get("llamacpp-inproc", {}).get("inproc")
    for ours in (n for n in peers if n.startswith("lmserve") and "levels" in peers[n]):
        mine, r = peers[ours]["levels"], {}
        for name, e in peers.items():
            if name.startswith("lmserve") or "levels" not in e:
                continue
            r[name] = {c: mine[c]["output_throughput"] / e["levels"][c]["output_throughput"]
                       for c in mine if c in e["levels"] and e["levels"][c]["output_throughput"] > 0}
        one = mine.get("1", {}).get("mean_decode_tok_s_per_request")
        if inproc and one:
            r["single_stream_vs_llamacpp_inproc"] = one / inproc["decode_tok_s"]
        out[ours] = r
    return out


def table(peers: dict) -> str:
    levels = _levels(peers)
    lines = [f"{'peer':<18}" + "".join(f"{'c=' + str(c) + ' tok/s':>14}" for c in levels)
             + f"{'TTFT p99@max':>14}{'decode@1':>10}  commit"]
    for name, e in peers.items():
        lv = e.get("levels")
        if not lv:
            continue
        row = f"{name:<18}" + "".join(f"{lv[str(c)]['output_throughput']:>14.1f}" if str(c) in lv else f"{'-':>14}"
                                      for c in levels)
        top = lv[str(max(int(c) for c in lv))]
        one = lv.get("1", {}).get("mean_decode_tok_s_per_request")
        commits = sorted({v["commit"] for v in lv.values()})
        lines.append(row + f"{top['ttft_ms']['p99'] / 1000:>13.2f}s" + (f"{one:>10.1f}" if one else f"{'-':>10}")
                     + "  " + ",".join(commits))
    inproc = peers.get("llamacpp-inproc", {}).get("inproc")
    if inproc:
        lines.append(f"{'llamacpp-inproc':<18}single-stream decode {inproc['decode_tok_s']:.1f} tok/s "
                     f"({inproc['method']})")
    for ours, r in ratios(peers).items():
        lines.append(f"{ours} output throughput / peer's:")
        for name, v in r.items():
            lines.append(f"  {name}: " + (", ".join(f"c={c}: {x:.2f}x" for c, x in v.items())
                                          if isinstance(v, dict) else f"{v:.2f}x"))
    return "\n".join(lines)


def write(path: str, peers: dict, extra: dict) -> dict:
    """summary.json: the merged per-peer table, ratios, and the flat views older readers used."""
    levels = _levels(peers)
    summary = {**extra, "levels": levels, "machine": machine(), "peers": peers, "lmserve_ratios": ratios(peers),
               "output_throughput": {n: {c: v["output_throughput"] for c, v in e["levels"].items()}
                                     for n, e in peers.items() if "levels" in e},
               "ttft_p99_ms": {n: {c: v["ttft_ms"]["p99"] for c, v in e["levels"].items()}
                               for n, e in peers.items() if "levels" in e},
               "llamacpp_inproc_decode_tok_s": peers.get("llamacpp-inproc", {}).get("inproc", {}).get("decode_tok_s")}
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def markdown(summary: dict) -> str:
    """The docs table of a summary.json: output tok/s per level, TTFT p99 at the top level, single-stream decode,
    each row's commit(s) and load average(s) before it ran, then lmserve's ratios."""
    peers, levels = summary["peers"], summary["levels"]
    top = max(levels)
    out = ["| peer | " + " | ".join(f"c={c} tok/s" for c in levels) + f" | TTFT p99 @{top} | single-stream decode "
           "| commit | load (1 min) |", "|---|" + "---:|" * (len(levels) + 2) + "---|---|"]
    for name, e in peers.items():
        if "levels" in e:
            lv = e["levels"]
            cells = [f"{lv[str(c)]['output_throughput']:.1f}" if str(c) in lv else "" for c in levels]
            ttft = f"{lv[str(top)]['ttft_ms']['p99'] / 1000:.2f} s" if str(top) in lv else ""
            one = lv.get("1", {}).get("mean_decode_tok_s_per_request")
            commits = ", ".join(sorted({v["commit"] for v in lv.values()}))
            loads = ", ".join(f"{lv[str(c)]['loadavg'][0]:.2f}" for c in levels if str(c) in lv)
            out.append(f"| {name} | " + " | ".join(cells) + f" | {ttft} | {f'{one:.1f} tok/s' if one else ''} "
                       f"| {commits} | {loads} |")
        elif "inproc" in e:
            i = e["inproc"]
            load = f"{i['loadavg'][0]:.2f}" if "loadavg" in i else ""
            out.append(f"| {name} | " + " | ".join("" for _ in levels) + f" | | {i['decode_tok_s']:.1f} tok/s "
                       f"| {i.get('commit', '')} | {load} |")
    out.append("")
    for ours, r in summary["lmserve_ratios"].items():
        parts = [f"{name} " + " / ".join(f"{v:.2f}x" for v in x.values()) + " (c=" + "/".join(x) + ")"
                 if isinstance(x, dict) else f"{name} {x:.2f}x" for name, x in r.items() if x]
        out.append(f"- {ours}: " + "; ".join(parts))
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    with open(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/peers/summary.json") as f:
        print(markdown(json.load(f)))
