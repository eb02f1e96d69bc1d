"""Start an api_server on a (large) GGUF and report start-up time, RSS/PSS at ready and after one 16-token completion,
and the server's lmserve:memory_bytes gauges.

    python benchmarks/big_start.py /work/peers/models/llama-3.1-8b-q4_k_m.gguf [api_server flags]

The file: benchmarks/synthetic_gguf.py --shape llama-3.1-8b --quant Q4_K_M. Not a test."""
import os, subprocess, sys, time, httpx, psutil, socket
path = sys.argv[1]
LOG = os.environ.get("BIG_START_LOG", "/tmp/big_start.log")
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
env = dict(os.environ)
t0 = time.monotonic()
p = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "api_server", path, "--server-name", "127.0.0.1",
                      "--server-port", str(port)] + sys.argv[2:], stdout=open(LOG, "w"),
                     stderr=subprocess.STDOUT, env=env)
proc = psutil.Process(p.pid); peak = 0
try:
    while True:
        try:
            peak = max(peak, proc.memory_info().rss)
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200: break
        except Exception: pass
        assert p.poll() is None, open(LOG).read()[-3000:]
        time.sleep(0.2)
    ready = time.monotonic() - t0
    mi = proc.memory_full_info()
    print(f"ready in {ready:.1f} s; RSS {mi.rss/2**30:.2f} GiB PSS {mi.pss/2**30:.2f} GiB peak-during-start {peak/2**30:.2f} GiB; file {os.path.getsize(path)/2**30:.2f} GiB")
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    t1 = time.monotonic()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "ignore_eos": True}, timeout=600).json()
    dt = time.monotonic() - t1
    mi = proc.memory_full_info()
    print(f"16 tokens in {dt:.1f} s (usage {r.get('usage')}); RSS after {mi.rss/2**30:.2f} GiB PSS {mi.pss/2**30:.2f} GiB")
    m = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    print("\n".join(l for l in m.splitlines() if l.startswith("lmserve:memory_bytes")))
finally:
    p.terminate(); p.wait(30)
print(open(LOG).read()[-1500:])
